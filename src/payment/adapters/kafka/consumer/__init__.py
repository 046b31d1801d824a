"""The inbox consumer: payment and refund requests and initiated events, handled
concurrently, committed in order.

- `loop.py`: the fetch loop, slots (`slots.py`) and dispatch;
- `tolerant_fetch.py`, `undecodable.py`: records the client library cannot decode;
- `routing.py`: record to command, once for both paths;
- `handling.py`, `batch_handling.py`: one message, or a batch of one topic;
- `dead_lettering.py`: parking poison messages;
- `offsets.py`: what may be committed, and committing as a group member;
- `rebalance.py`: partitions leaving and arriving.
- `intake_gate.py`: request intake paused while the outbox backlog is high.
"""

from payment.adapters.kafka.consumer.handling import MAX_HANDLER_ERRORS
from payment.adapters.kafka.consumer.loop import MAX_BATCH, KafkaInboxConsumer
from payment.adapters.kafka.consumer.offsets import PartitionProgress, commit_as_member
from payment.adapters.kafka.consumer.undecodable import UndecodableRecord
from payment.application.ports import DeadLetters

__all__ = [
    "MAX_BATCH",
    "MAX_HANDLER_ERRORS",
    "DeadLetters",
    "KafkaInboxConsumer",
    "PartitionProgress",
    "UndecodableRecord",
    "commit_as_member",
]
