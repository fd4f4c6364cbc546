"""`tf.train.Example` protocol buffers, encoded and decoded without TensorFlow.

Only the three feature kinds exist (bytes, float, int64 lists), so the wire format is
short enough to write out here; `tests/test_records.py` checks it against the `tfrecord`
package's compiled protobuf.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

Feature = bytes | str | int | float | list


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64s are ten-byte two's complement varints
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(value: Feature) -> bytes:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError("empty feature lists are not written")
    if all(isinstance(v, bytes | str) for v in values):
        items = b"".join(_field(1, v.encode() if isinstance(v, str) else v) for v in values)
        return _field(1, items)
    if all(isinstance(v, int) for v in values):
        return _field(3, _field(1, b"".join(_varint(v) for v in values)))
    if all(isinstance(v, int | float) for v in values):
        return _field(2, _field(1, struct.pack(f"<{len(values)}f", *values)))
    raise TypeError(f"feature values must all be bytes/str, int or float, got {values!r}")


def encode_example(features: Mapping[str, Feature]) -> bytes:
    """dict -> serialized tf.train.Example (str is utf-8 bytes; None values are left out)."""
    entries = b"".join(_field(1, _field(1, key.encode()) + _field(2, _feature(value)))
                       for key, value in sorted(features.items()) if value is not None)
    return _field(1, entries)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 2:
            size, pos = _read_varint(buf, pos)
            yield number, buf[pos:pos + size]
            pos += size
        elif wire == 0:
            value, pos = _read_varint(buf, pos)
            yield number, value
        elif wire == 5:
            yield number, buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _decode_feature(buf: bytes) -> list:
    for kind, payload in _fields(buf):
        values = [v for n, v in _fields(payload) if n == 1]
        if kind == 1:
            return [bytes(v) for v in values]
        if kind == 3:
            ints = []
            for v in values:  # packed (bytes) or not (int)
                if isinstance(v, int):
                    ints.append(v)
                    continue
                pos = 0
                while pos < len(v):
                    n, pos = _read_varint(v, pos)
                    ints.append(n)
            return [n - (1 << 64) if n >> 63 else n for n in ints]
        if kind == 2:
            raw = b"".join(v for v in values)
            return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return []


def decode_example(data: bytes) -> dict[str, list]:
    """serialized tf.train.Example -> {name: list of bytes | int | float}."""
    out = {}
    for number, features in _fields(data):
        if number != 1:
            continue
        for entry_number, entry in _fields(features):
            if entry_number != 1:
                continue
            parts = dict(_fields(entry))
            out[bytes(parts.get(1, b"")).decode()] = _decode_feature(parts.get(2, b""))
    return out
