"""Just enough PNG for the demo: write a sample picture, read a picture's size."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_sample(path: Path, width: int = 320, height: int = 200) -> Path:
    """An RGB picture of colour gradients and a checkerboard (no text), as an 8-bit PNG."""
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter: none
        for x in range(width):
            check = 255 if (x // 20 + y // 20) % 2 else 0
            row += bytes((x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), check))
        rows.append(bytes(row))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
    path.write_bytes(data + _chunk(b"IEND", b""))
    return path


def size_of(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG; ``ValueError`` when ``data`` is not one."""
    if not data.startswith(SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
