"""The hex text of a session key is never copied out of the decrypted buffer (issue 14,
finding 9).

The review found the hex of a session key in process memory after its connection had
closed: the decrypted session data was turned into ``bytes`` and a ``str`` for
``json.loads``, which made another ``str`` of the key's hex; all were freed, not zeroed.
Now the digits are decoded straight from the decrypted ``bytearray`` and overwritten
there before anything else reads the text.

``str`` and ``bytes`` objects are not tracked by the garbage collector, so no object scan
can find copies. This test looks at the memory itself: a fresh Python process (nothing
else in it ever held these keys) opens several inits whose session data was written
byte by byte into a ``bytearray`` (so the test itself never makes a ``str`` or ``bytes``
of the hex), and after each reads its own writable memory through ``/proc/self/mem`` and
counts where the hex of that key appears. The only allowed place is the buffer holding
the search needle itself. Freed memory keeps its content until reused, so the copies the
old code made are found there (in every trial).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = r"""
import ctypes, gc, json, os, re, sys
from node.crypto.secret import SecretBytes
from node.crypto.session_init import open_session_init, parse_init_payload
from tests.crypto._frames import Frame, HOST

DIGITS = b"0123456789abcdef"
TRIALS = 6


def hex_into(buf, at, raw):
    for i, byte in enumerate(raw):
        buf[at + 2 * i] = DIGITS[byte >> 4]
        buf[at + 2 * i + 1] = DIGITS[byte & 15]


def address(buf):
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


class BufferFrame(Frame):
    buffer = None

    def plaintext_bytes(self):
        return self.buffer  # a bytearray: aead.seal reads it in place


MAPS = bytearray(1 << 20)
CHUNK = bytearray(1 << 20)
RW = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) rw", re.M)


def scan(needle, skip):
    # Nothing here makes objects the size of the old copies (str/bytes of about 100
    # bytes), which would land in their freed memory and overwrite them: the maps are
    # read into a preallocated buffer and walked by offsets.
    found = 0
    skip = skip + [(address(CHUNK), address(CHUNK) + len(CHUNK))]
    with open("/proc/self/maps", "rb", buffering=0) as maps:
        size = maps.readinto(MAPS)
    regions = [(int(m.group(1), 16), int(m.group(2), 16)) for m in RW.finditer(MAPS, 0, size)]
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        for start, end in regions:
            at = start
            while at < end:
                size = min(len(CHUNK), end - at)
                try:
                    mem.seek(at)
                    got = mem.readinto(memoryview(CHUNK)[:size])
                except OSError:
                    break
                pos = CHUNK.find(needle, 0, got)
                while pos != -1:
                    if not any(lo <= at + pos < hi for lo, hi in skip):
                        found += 1
                    pos = CHUNK.find(needle, pos + 1, got)
                # overlap by the needle length so no match is cut in two
                at += max(got - len(needle), 1) if got == size else size
    CHUNK[:] = bytes(len(CHUNK))
    return found


template = json.dumps({
    "sessionKey": "#" * 64, "jobId": "42", "modelName": "tiny-model",
    "pricePerToken": 1000,
    "recoveryPublicKey": "0x" + Frame().signer.public_key.format(compressed=True).hex(),
}).encode()
at = template.index(b"#" * 64)
counts = []
for trial in range(TRIALS):
    raw = os.urandom(32)
    needle = bytearray(64)
    hex_into(needle, 0, raw)
    plaintext = bytearray(template)
    hex_into(plaintext, at, raw)
    frame = BufferFrame(nonce=os.urandom(24))
    frame.buffer = plaintext
    payload = frame.payload()
    plaintext[:] = bytes(len(plaintext))
    data = open_session_init(HOST, parse_init_payload(payload))
    assert data.session_key.equals(raw)
    data.session_key.wipe()
    del data, payload, frame, plaintext
    raw = None
    gc.collect()
    counts.append(scan(needle, [(address(needle), address(needle) + len(needle))]))
print(json.dumps(counts))
"""


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_no_copy_of_the_session_key_hex_is_left_in_memory() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts == [0] * len(counts), f"copies of each key's hex found in memory: {counts}"
