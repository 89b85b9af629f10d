"""A v2 client written from docs/PROTOCOL_V2.md alone, against the node's core.

It uses only hashlib/hmac, coincurve (point multiplication, signing), libsodium's
ChaCha20-Poly1305 and pycryptodome's Keccak: no import from node.crypto or from
node.protocol.v2 on the client side. If the document missed a byte, this fails.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from coincurve import PrivateKey, PublicKey
from Crypto.Hash import keccak
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)

from node.crypto.hostkey import HostKey
from node.protocol.connection import SessionStarted, StartRequest
from node.protocol.v2.server import Send, ServerConnectionV2


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hkdf(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    t = hmac.digest(ck, ikm, "sha256")
    o1 = hmac.digest(t, b"\x01", "sha256")
    return o1, hmac.digest(t, o1 + b"\x02", "sha256")


def nonce(n: int) -> bytes:
    return bytes(4) + n.to_bytes(8, "little")


def dh(private: PrivateKey, public: bytes) -> bytes:
    return sha(PublicKey(public).multiply(private.secret).format(compressed=True))


class Direction:
    def __init__(self, k: bytes, ck: bytes) -> None:
        self.k, self.ck, self.n = k, ck, 0

    def _step(self) -> None:
        self.n += 1
        if self.n == 1000:
            self.ck, self.k = hkdf(self.ck, self.k)
            self.n = 0

    def seal(self, record: bytes) -> bytes:
        out = crypto_aead_chacha20poly1305_ietf_encrypt(record, b"", nonce(self.n), self.k)
        self._step()
        return out

    def open(self, frame: bytes) -> bytes:
        out = crypto_aead_chacha20poly1305_ietf_decrypt(frame, b"", nonce(self.n), self.k)
        self._step()
        return out


def record(kind: int, obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    return bytes((kind,)) + len(body).to_bytes(4, "big") + body


def unrecord(data: bytes) -> tuple[int, dict[str, Any]]:
    size = int.from_bytes(data[1:5], "big")
    assert len(data) == 5 + size
    return data[0], json.loads(data[5 : 5 + size])


def personal_sign(key: PrivateKey, text: bytes) -> str:
    digest = keccak.new(
        digest_bits=256, data=b"\x19Ethereum Signed Message:\n" + str(len(text)).encode() + text
    ).digest()
    sig = key.sign_recoverable(digest, hasher=None)
    return "0x" + (sig[:64] + bytes((sig[64] + 27,))).hex()


def eth_address(key: PrivateKey) -> str:
    raw = keccak.new(digest_bits=256, data=key.public_key.format(compressed=False)[1:])
    return "0x" + raw.digest()[-20:].hex()


def test_a_client_written_from_the_document_alone() -> None:
    host = HostKey.generate()
    node = ServerConnectionV2(host_key=host, clock=lambda: 0.0)
    server_static = host.public_key  # from GET /v1/host-key

    # 3.1 and 3.2
    h = sha(b"Noise_NK_secp256k1_ChaChaPoly_SHA256")
    ck = h
    h = sha(h + b"llm-node/v2")
    h = sha(h + server_static)
    e = PrivateKey()
    e_pub = e.public_key.format(compressed=True)
    h = sha(h + e_pub)
    ck, k = hkdf(ck, dh(e, server_static))
    c = crypto_aead_chacha20poly1305_ietf_encrypt(b"{}", h, nonce(0), k)
    h = sha(h + c)
    (reply,) = [a.frame for a in node.receive(e_pub + c) if isinstance(a, Send)]

    # 3.3 and 3.4
    re = reply[:33]
    h = sha(h + re)
    ck, k = hkdf(ck, dh(e, re))
    payload2 = crypto_aead_chacha20poly1305_ietf_decrypt(reply[33:], h, nonce(0), k)
    h = sha(h + reply[33:])
    assert json.loads(payload2) == {
        "protocol": "llm-node/2",
        "max_record": 65536,
        "rekey_every": 1000,
        "padding": 0,
    }
    k_c2n, k_n2c = hkdf(ck, b"")
    send, recv = Direction(k_c2n, ck), Direction(k_n2c, ck)

    # 5.1
    wallet = PrivateKey()
    text = "\n".join(
        [
            "llm-node session v2",
            f"handshake: 0x{h.hex()}",
            "job: 9",
            "model: smollm2",
            "price: 5",
            "chain: 84532",
            "recovery: none",
            "vector-db: none",
        ]
    ).encode()
    session = {
        "type": "session",
        "job_id": "9",
        "model": "smollm2",
        "price_per_token": "5",
        "chain_id": 84532,
        "address": eth_address(wallet),
        "signature": personal_sign(wallet, text),
    }
    actions = node.receive(send.seal(record(0x01, session)))
    assert isinstance(actions[0], SessionStarted)
    kind, ack = unrecord(recv.open(next(a.frame for a in actions if isinstance(a, Send))))
    assert kind == 0x01
    assert ack["type"] == "session_ack"
    assert ack["client_address"].lower() == eth_address(wallet)
    assert ack["session_id"] == h[:16].hex()

    # 5.2 and 5.3, past one rotation in each direction
    for _ in range(1000):
        (pong,) = [a.frame for a in node.receive(send.seal(record(1, {"type": "ping"})))]
        assert unrecord(recv.open(pong)) == (1, {"type": "pong"})
    actions = node.receive(
        send.seal(record(1, {"type": "request", "request_id": "q", "prompt": "hi"}))
    )
    assert isinstance(actions[0], StartRequest)
    assert unrecord(recv.open(node.chunk("q", "hello", 1)))[1]["text"] == "hello"
    kind, end = unrecord(recv.open(node.finish("q", "stop", prompt_tokens=1)))
    assert (kind, end["finish_reason"], end["usage"]["total_tokens"]) == (2, "stop", 2)
    node.receive(send.seal(record(4, {"reason": "bye"})))
    assert node.closed
