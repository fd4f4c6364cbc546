"""Record files: ArrayRecord (random access, global shuffle) and TFRecord (for TF/tfds pipelines)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import google_crc32c

Format = Literal["arrayrecord", "tfrecord"]
SUFFIX = {"arrayrecord": ".array_record", "tfrecord": ".tfrecord"}


class RecordError(ValueError):
    """A record file that is corrupt or not a record file; the message names it and the offset."""


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TFRecordWriter:
    def __init__(self, path: str | Path):
        self._f = open(path, "wb")  # noqa: SIM115 (closed in close())

    def write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._f.write(length + struct.pack("<I", _masked_crc(length)) + record + struct.pack("<I", _masked_crc(record)))

    def close(self) -> None:
        self._f.close()


def read_tfrecord(path: str | Path, verify: bool = True) -> Iterator[bytes]:
    """The records of a TFRecord file, with both CRCs checked unless `verify=False`."""
    with open(path, "rb") as f:
        offset = 0
        while header := f.read(12):
            if len(header) < 12:
                raise RecordError(f"{path}: truncated record header at byte {offset}")
            (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if verify and _masked_crc(header[:8]) != length_crc:
                raise RecordError(f"{path}: length CRC mismatch at byte {offset} (not a TFRecord file, or corrupt)")
            body = f.read(length + 4)
            if len(body) < length + 4:
                raise RecordError(f"{path}: truncated record at byte {offset}")
            record, (crc,) = body[:length], struct.unpack("<I", body[length:])
            if verify and _masked_crc(record) != crc:
                raise RecordError(f"{path}: data CRC mismatch in the record at byte {offset}")
            offset += 12 + length + 4
            yield record


class ArrayRecordWriter:
    def __init__(self, path: str | Path):
        from array_record.python.array_record_module import ArrayRecordWriter as Writer

        # group_size:1 makes every record its own chunk: true random access for global shuffle.
        self._w = Writer(str(path), "group_size:1")

    def write(self, record: bytes) -> None:
        self._w.write(record)

    def close(self) -> None:
        self._w.close()


def read_arrayrecord(path: str | Path) -> Iterator[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(str(path))
    except Exception as e:  # the C++ reader raises RuntimeError or ValueError variously
        raise RecordError(f"{path}: not a readable ArrayRecord file ({e})") from None
    try:
        for i in range(reader.num_records()):
            yield reader.read([i])[0]
    finally:
        reader.close()


def writer(path: str | Path, fmt: Format):
    return ArrayRecordWriter(path) if fmt == "arrayrecord" else TFRecordWriter(path)


def read_records(path: str | Path) -> Iterator[bytes]:
    path = Path(path)
    return read_arrayrecord(path) if path.name.endswith(SUFFIX["arrayrecord"]) else read_tfrecord(path)
