"""CPU per record of aiokafka's producer: `send()` record by record against `send_batch()`.

The records look like the relay's (a CloudEvents header set, a ~200-byte JSON value,
distinct keys) and go to an Apache Kafka broker started here (Tansu with
`PAYMENT_BENCH_BROKER=tansu`; or `$PAYMENT_TEST_KAFKA_BOOTSTRAP_SERVERS`). Process CPU
time per record, both ways in alternating rounds, acknowledgements awaited each time.

    .venv/bin/python bench/producer.py --records 5000 --rounds 3

`--linger 0,5` measures instead how long a relay round waits for its acknowledgements
with the service's producer (`create_producer`: acks=all, idempotent) at each linger:
rounds of a few records, one producer per linger, taking turns round by round so that
both see the same machine.

    .venv/bin/python bench/producer.py --linger 0,5 --rounds 300 --records 4
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from aiokafka import AIOKafkaProducer
from benchlib import broker

from payment.adapters.kafka.producer import create_producer
from payment.adapters.kafka.topics import ensure_topics

TOPIC = "bench-producer"
HEADERS = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"5f0c6a0e-1111-4222-8333-444455556666"),
    ("ce_source", b"payment-service"),
    ("ce_type", b"payment.completed"),
    ("ce_time", b"2026-11-26T14:00:00.000000Z"),
    ("ce_sequence", b"3"),
    ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("content-type", b"application/json"),
]
VALUE = (
    b'{"payment_id":"5f0c6a0e-1111-4222-8333-444455556666","booking_id":"bk-1",'
    b'"amount":1000,"currency":"EUR","provider_reference":"ch_123",'
    b'"completed_at":"2026-11-26T14:00:00Z"}'
)


async def one_by_one(producer: AIOKafkaProducer, count: int) -> float:
    started = time.process_time()
    acks = [
        await producer.send(TOPIC, VALUE, key=b"key-%d" % i, headers=HEADERS) for i in range(count)
    ]
    await asyncio.gather(*acks)
    return (time.process_time() - started) / count


async def batched(producer: AIOKafkaProducer, partitions: list[int], count: int) -> float:
    started = time.process_time()
    acks = []
    for n, partition in enumerate(partitions):
        batch = producer.create_batch()
        for i in range(n, count, len(partitions)):
            key = b"key-%d" % i
            if batch.append(key=key, value=VALUE, timestamp=None, headers=HEADERS) is None:
                batch.close()
                acks.append(await producer.send_batch(batch, TOPIC, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=VALUE, timestamp=None, headers=HEADERS)
        batch.close()
        acks.append(await producer.send_batch(batch, TOPIC, partition=partition))
    await asyncio.gather(*acks)
    return (time.process_time() - started) / count


async def main(count: int, rounds: int) -> None:
    with broker() as kafka:
        bootstrap = kafka.bootstrap
        await ensure_topics(bootstrap, [TOPIC], partitions=6)
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            enable_idempotence=kafka.kind == "kafka",  # as the service's relay
            max_batch_size=256 * 1024,
        )
        await producer.start()
        try:
            await producer.send_and_wait(TOPIC, b"warm-up", key=b"k")
            partitions = sorted(await producer.partitions_for(TOPIC))
            single: list[float] = []
            batch: list[float] = []
            for _ in range(rounds):
                single.append(await one_by_one(producer, count))
                batch.append(await batched(producer, partitions, count))
        finally:
            await producer.stop()
    one = statistics.median(single) * 1e6
    many = statistics.median(batch) * 1e6
    print(f"records per round: {count}, rounds: {rounds}, partitions: {len(partitions)} (medians)")
    print(f"send(), record by record: {one:6.1f} us CPU per record")
    print(f"send_batch(), per partition: {many:4.1f} us CPU per record")
    print(f"ratio: {one / many:.1f}x")


async def ack_latency(lingers: list[int], count: int, rounds: int) -> None:
    """Wall time from a round's first send to its last ack, per linger (ms)."""
    with broker() as kafka:
        await ensure_topics(kafka.bootstrap, [TOPIC], partitions=6)
        producers = [
            create_producer(
                kafka.bootstrap, enable_idempotence=kafka.kind == "kafka", linger_ms=linger
            )
            for linger in lingers
        ]
        for producer in producers:
            await producer.start()
        waits: list[list[float]] = [[] for _ in lingers]
        try:
            for n in range(rounds):
                for producer, found in zip(producers, waits, strict=True):
                    started = time.perf_counter()
                    acks = [
                        await producer.send(
                            TOPIC, VALUE, key=b"key-%d-%d" % (n, i), headers=HEADERS
                        )
                        for i in range(count)
                    ]
                    await asyncio.gather(*acks)
                    found.append(1000 * (time.perf_counter() - started))
                    await asyncio.sleep(0.005)
        finally:
            for producer in producers:
                await producer.stop()
    print(f"rounds of {count} records, {rounds} per linger, taking turns; ms to the last ack:")
    for linger, found in zip(lingers, waits, strict=True):
        ordered = sorted(found)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        print(f"linger {linger:>3} ms: median {statistics.median(found):6.2f}, p95 {p95:6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--linger", help="comma-separated lingers (ms): ack waits instead")
    args = parser.parse_args()
    if args.linger:
        lingers = [int(x) for x in args.linger.split(",")]
        asyncio.run(ack_latency(lingers, args.records, args.rounds))
    else:
        asyncio.run(main(args.records, args.rounds))
