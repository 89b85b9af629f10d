"""Wipeable secret buffers.

Python cannot promise that a secret never exists anywhere but in one buffer: the
libraries we call (libsodium through PyNaCl, libsecp256k1 through coincurve) take
immutable ``bytes`` arguments, so a short-lived copy exists for the length of each call
and is freed, not zeroed, by the garbage collector afterwards; coincurve's ``PrivateKey``
also keeps its own ``bytes`` copy of the scalar for its lifetime. What this type does
promise is that the long-lived copy the node owns is a ``bytearray`` that is overwritten
with zeros by :meth:`SecretBytes.wipe`, that the object never prints, pickles or
compares its content by ``==``, and that callers are steered to constant-time compares.
"""

from __future__ import annotations

import hmac
from types import TracebackType
from typing import NoReturn, Self


def _memzero(buf: bytearray) -> None:
    """Overwrite ``buf`` in place with zeros (like libsodium's ``sodium_memzero``).

    A same-length slice assignment copies into the existing allocation (CPython never
    reallocates a bytearray whose size does not change), at a quarter of the cost of a
    ctypes ``memset``; tests/crypto check that the very buffer ends up zero."""
    buf[:] = bytes(len(buf))


def constant_time_equal(
    a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview
) -> bool:
    """Compare two byte strings in time independent of where they differ.

    Every comparison of secrets, MACs, keys or addresses in the node goes through here.
    """
    return hmac.compare_digest(bytes(a), bytes(b))


class SecretBytes:
    """A bytearray-backed secret that can be zeroed in place.

    Use as a context manager to wipe on exit. ``repr``/``str`` are redacted, pickling is
    refused, and ``==`` raises: compare with :meth:`equals` (constant time).
    """

    __slots__ = ("_buf", "_wiped")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buf = bytearray(data)
        self._wiped = False

    @classmethod
    def take(cls, data: bytearray) -> SecretBytes:
        """Adopt ``data`` without copying it; the caller must not keep another reference."""
        obj = cls.__new__(cls)
        obj._buf = data
        obj._wiped = False
        return obj

    def __len__(self) -> int:
        return len(self._buf)

    @property
    def wiped(self) -> bool:
        return self._wiped

    def reveal(self) -> bytes:
        """A transient immutable copy for a library call. Do not store it."""
        if self._wiped:
            raise ValueError("secret was wiped")
        return bytes(self._buf)

    def view(self) -> memoryview:
        """A read-only view of the live buffer (no copy)."""
        if self._wiped:
            raise ValueError("secret was wiped")
        return memoryview(self._buf).toreadonly()

    def live_buffer(self) -> bytearray:
        """The live buffer, for the crypto core to hand to C without a copy. Not for
        anything that could keep, print or send it."""
        if self._wiped:
            raise ValueError("secret was wiped")
        return self._buf

    def is_all_zero(self) -> bool:
        """True when every byte of the buffer is zero (used by tests after a wipe)."""
        return not any(self._buf)

    def buffer_for_tests(self) -> bytearray:
        """The live buffer itself, so a test can check that it was really zeroed."""
        return self._buf

    def wipe(self) -> None:
        """Zero the buffer in place. Safe to call more than once."""
        _memzero(self._buf)
        self._wiped = True

    def equals(self, other: SecretBytes | bytes | bytearray) -> bool:
        """Constant-time comparison with another secret or byte string."""
        theirs = other._buf if isinstance(other, SecretBytes) else other
        return hmac.compare_digest(bytes(self._buf), bytes(theirs))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __eq__(self, other: object) -> NoReturn:
        raise TypeError("SecretBytes cannot be compared with ==; use .equals() (constant time)")

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        state = "wiped" if self._wiped else "redacted"
        return f"<SecretBytes len={len(self._buf)} {state}>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SecretBytes cannot be pickled")

    def __bytes__(self) -> NoReturn:
        raise TypeError("SecretBytes does not convert implicitly; call .reveal()")
