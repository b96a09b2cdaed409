"""TensorBoard event files without the tensorboard package: scalars as ``Event`` protobufs in TFRecord framing.

Record: u64 length, u32 masked CRC32C of the length, payload, u32 masked CRC32C of the payload. Event: wall_time
(field 1, double), step (2, varint), file_version (3, string) on the first record, summary (5) holding
Value{tag (1, string), simple_value (2, float)}.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int | None = None, file_version: str | None = None,
                 scalars: dict[str, float] | None = None) -> bytes:
    msg = b"\x09" + struct.pack("<d", wall_time)
    if step is not None:
        msg += b"\x10" + _varint(step)
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(_field_bytes(1, _field_bytes(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())
        msg += _field_bytes(5, values)
    return msg


def frame(record: bytes) -> bytes:
    header = struct.pack("<Q", len(record))
    return header + struct.pack("<I", _masked(crc32c(header))) + record + struct.pack("<I", _masked(crc32c(record)))


def read_records(path: str | Path) -> list[bytes]:
    """The payloads of a TFRecord file, CRCs checked (for tests and tools)."""
    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack_from("<Q", data, i)
        if struct.unpack_from("<I", data, i + 8)[0] != _masked(crc32c(data[i:i + 8])):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        payload = data[i + 12:i + 12 + n]
        if struct.unpack_from("<I", data, i + 12 + n)[0] != _masked(crc32c(payload)):
            raise ValueError(f"{path}: bad payload CRC at byte {i}")
        out.append(payload)
        i += 16 + n
    return out


class EventWriter:
    def __init__(self, logdir: str | Path):
        self.dir = Path(logdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._f = open(self.path, "ab")
        self._f.write(frame(encode_event(time.time(), file_version="brain.Event:2")))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._f.write(frame(encode_event(time.time(), step=step, scalars={tag: float(value)})))
        self._f.flush()

    def close(self) -> None:
        self._f.close()
