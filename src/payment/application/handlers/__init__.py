"""Command handlers, one module per command; one transaction per handled message.

request.py: `saga.request_payment`; execute.py: `payment.initiated` (start the charge,
charge, record); reconcile.py: payments left in flight; outcome.py: recording what a
charge came to; results.py: what each handling came to. The gateway exchange they share
is `application.gateway.ChargeGateway`. Batches of these: `application.batches`; refunds
and reviews: `application.refunds`, `application.review`.
"""

from payment.application.conflicts import MAX_CONFLICT_RETRIES
from payment.application.gateway import ExecutionPolicy
from payment.application.handlers.execute import execute_payment
from payment.application.handlers.reconcile import reconcile_payment
from payment.application.handlers.request import Settings, request_payment
from payment.application.handlers.results import ExecuteResult, RequestResult

__all__ = [
    "MAX_CONFLICT_RETRIES",
    "ExecuteResult",
    "ExecutionPolicy",
    "RequestResult",
    "Settings",
    "execute_payment",
    "reconcile_payment",
    "request_payment",
]
