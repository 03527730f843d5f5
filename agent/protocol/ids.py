"""Message identifiers: UUIDv7 (RFC 9562) built from a caller-supplied time.

The session is sans-I/O and reads no clock, so the time is an argument; the random part
comes from a caller-supplied byte source (``os.urandom`` by default).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

RandomBytes = Callable[[int], bytes]


def uuid7(unix_ms: int, random_bytes: RandomBytes = os.urandom) -> str:
    """Return a UUIDv7 string for ``unix_ms`` (milliseconds since the epoch).

    Layout: 48-bit big-endian timestamp, version 7, 12 random bits, variant ``10``,
    62 random bits. Identifiers made later sort later (to the millisecond).
    """
    if not 0 <= unix_ms < 1 << 48:
        raise ValueError(f"unix_ms out of range for UUIDv7: {unix_ms}")
    rand = int.from_bytes(random_bytes(10), "big")
    rand_a = rand >> 68 & 0xFFF
    rand_b = rand & ((1 << 62) - 1)
    value = unix_ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return str(uuid.UUID(int=value))
