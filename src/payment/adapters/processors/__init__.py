"""Payment processor adapters: fake and Stripe (sandbox = Stripe in test mode)."""

from typing import Literal

# Which processor the service charges through (PAYMENT_PROCESSOR): the one name for it.
ProcessorKind = Literal["fake", "sandbox", "stripe"]
