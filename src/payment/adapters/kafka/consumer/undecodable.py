"""Reading record batches the client library refuses (contract 4.5: any bytes the broker
accepts).

aiokafka decodes a fetched batch inside `getmany` and raises on the first record it cannot
read: a header name that is not UTF-8 (Java, librdkafka and franz-go producers write
any bytes there, and the brokers store them), a batch compressed with a codec whose
library is not installed (snappy, lz4, zstd), a CRC that does not match, a record whose
lengths or varints do not add up, an old message format. The records of that batch,
good ones included, never come out of `getmany`.

`read_batches` reads the same bytes leniently: each record it can read becomes a
`ConsumerRecord` as aiokafka would have made it; a record with a header name that is not
UTF-8 keeps its key, value and headers (the name escaped) and becomes an
`UndecodableRecord`; what cannot be read at all becomes an `UndecodableRecord` without
key, value or headers, one for the offsets it covered, whose reason names them and the
error. Undecodable records are dead-lettered by the consumer like any poison message.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka.codec import gzip_decode, lz4_decode, snappy_decode, zstd_decode
from aiokafka.record.util import calc_crc32c, decode_varint
from aiokafka.structs import ConsumerRecord, TopicPartition

# BaseOffset, Length, PartitionLeaderEpoch, Magic, CRC, Attributes, LastOffsetDelta,
# FirstTimestamp, MaxTimestamp, ProducerId, ProducerEpoch, BaseSequence, record count.
_HEADER = struct.Struct(">qiibIhiqqqhii")
_LOG_OVERHEAD = 12  # BaseOffset and Length, before what Length counts
_CRC_FROM = 21  # the CRC covers the batch from Attributes on
_CODECS: dict[int, tuple[str, Callable[[bytes], bytes]]] = {
    1: ("gzip", gzip_decode),
    2: ("snappy", snappy_decode),
    3: ("lz4", lz4_decode),
    4: ("zstd", zstd_decode),
}
_CONTROL = 0x20
_LOG_APPEND_TIME = 0x08


@dataclass
class UndecodableRecord(ConsumerRecord[bytes, bytes]):  # type: ignore[misc]
    """A record the client library could not decode; `reason` says why, for its dead letter."""

    reason: str = ""


@dataclass
class Batches:
    """What `read_batches` read: the records from the start offset on, and the offset after
    the last batch read whole (where fetching goes on)."""

    records: list[ConsumerRecord[bytes, bytes]] = field(default_factory=list)
    next_offset: int | None = None
    # Reading stopped at a batch aiokafka cannot decode (its records may all be readable
    # here: bytes after the last one, say).
    stopped_at_bad_batch: bool = False

    @property
    def undecodable(self) -> list[UndecodableRecord]:
        return [r for r in self.records if isinstance(r, UndecodableRecord)]


def read_batches(tp: TopicPartition, data: bytes, start: int) -> Batches:
    """Read the batches of a fetch response's record set up to the first that holds
    something aiokafka cannot decode (all of them if none does)."""
    read = Batches()
    pos = 0
    while pos + _LOG_OVERHEAD <= len(data):
        base, length = struct.unpack_from(">qi", data, pos)
        end = pos + _LOG_OVERHEAD + length
        if length < _HEADER.size - _LOG_OVERHEAD or end > len(data):
            break  # the fetch's last batch, cut short by its size limit
        batch = data[pos:end]
        pos = end
        bad = _read_batch(tp, batch, start, read.records)
        read.next_offset = max(start, base + struct.unpack_from(">i", batch, 23)[0] + 1)
        if bad:
            read.stopped_at_bad_batch = True
            break
    return read


def _read_batch(
    tp: TopicPartition, batch: bytes, start: int, out: list[ConsumerRecord[bytes, bytes]]
) -> bool:
    """Append the batch's records from `start` on to `out`; True if any is undecodable."""
    (base, _, _, magic, crc, attributes, last_delta, first_ts, max_ts, *_, count) = (
        _HEADER.unpack_from(batch)
    )
    last = base + last_delta

    def skipped(error: str, first: int = base) -> bool:
        """One dead letter for offsets `first`..`last` of the batch, at the last of them
        (none when every record up to `last` was read: bytes after it only)."""
        if out and out[-1].offset >= last:
            return True
        if last >= start:
            where = f"offset {last}" if first == last else f"offsets {first}..{last}"
            reason = f"record batch: {where} cannot be decoded: {error}"
            out.append(_undecodable(tp, last, max_ts, reason[:400]))
        return True

    if magic != 2:
        return skipped(f"message format v{magic}")
    if calc_crc32c(batch[_CRC_FROM:]) != crc:
        return skipped("CRC mismatch")
    if attributes & _CONTROL:
        return False
    body = batch[_HEADER.size :]
    codec = attributes & 0x07
    if codec:
        name, decompress = _CODECS.get(codec, (f"codec {codec}", _unknown_codec))
        try:
            body = decompress(body)
        except Exception as exc:  # a missing library, or bytes that do not decompress
            return skipped(f"{name}: {type(exc).__name__}: {exc}")
    log_append = bool(attributes & _LOG_APPEND_TIME)
    pos = 0
    bad = False
    for index in range(count):
        offset = base + index
        try:
            length, at = decode_varint(body, pos)
            if length < 0 or at + length > len(body):
                raise ValueError(f"record length {length}")
            record, offset = _read_record(tp, body[at : at + length], base, first_ts, max_ts)
            record.timestamp = max_ts if log_append else record.timestamp
            pos = at + length
        except Exception as exc:
            return skipped(f"{type(exc).__name__}: {exc}", first=offset)
        bad = bad or isinstance(record, UndecodableRecord)
        if offset >= start:
            out.append(record)
    if pos != len(body):
        return skipped(f"{len(body) - pos} bytes after the last record")
    return bad


def _read_record(
    tp: TopicPartition, body: bytes, base: int, first_ts: int, max_ts: int
) -> tuple[ConsumerRecord[bytes, bytes], int]:
    _, pos = decode_varint(body, 0)  # attributes, unused
    ts_delta, pos = decode_varint(body, pos)
    offset_delta, pos = decode_varint(body, pos)
    offset = base + offset_delta
    key, pos = _nullable(body, pos)
    value, pos = _nullable(body, pos)
    count, pos = decode_varint(body, pos)
    if count < 0:
        raise ValueError(f"{count} headers")
    headers: list[tuple[str, bytes | None]] = []
    not_utf8: list[int] = []
    for index in range(count):
        name, pos = _nullable(body, pos)
        if name is None:
            raise ValueError("a header without a name")
        header_value, pos = _nullable(body, pos)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            text = name.decode("utf-8", "backslashreplace")
            not_utf8.append(index)
        headers.append((text, header_value))
    if pos != len(body):
        raise ValueError(f"{len(body) - pos} bytes after the headers")
    fields = (tp.topic, tp.partition, offset, first_ts + ts_delta, 0, key, value, None)
    sizes = (-1 if key is None else len(key), -1 if value is None else len(value))
    if not not_utf8:
        return ConsumerRecord(*fields, *sizes, tuple(headers)), offset
    which = ", ".join(str(i) for i in not_utf8)
    reason = f"header name not UTF-8 (header {which}; escaped in the dead letter)"
    return UndecodableRecord(*fields, *sizes, tuple(headers), reason=reason), offset


def _nullable(body: bytes, pos: int) -> tuple[bytes | None, int]:
    length, pos = decode_varint(body, pos)
    if length < 0:
        return None, pos
    if pos + length > len(body):
        raise ValueError(f"length {length} past the record's end")
    return body[pos : pos + length], pos + length


def _undecodable(tp: TopicPartition, offset: int, timestamp: int, reason: str) -> UndecodableRecord:
    return UndecodableRecord(
        tp.topic, tp.partition, offset, timestamp, 0, None, None, None, -1, -1, (), reason=reason
    )


def _unknown_codec(_: bytes) -> bytes:
    raise ValueError("unknown compression codec")
