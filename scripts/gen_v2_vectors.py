"""Generate the protocol v2 test vectors (tests/vectors/v2/transcript.json).

A full fixed-key session: the Noise NK handshake over secp256k1 step by step, the
session record and its signature, an answer (chunks and END), 999 pings so that each
direction rotates its key once, an ERROR record, and the client's CLOSE record; then a
short second session with padding. Every frame is produced by the node's own code
(``node.protocol.v2``: ``ClientConnectionV2`` and ``ServerConnectionV2`` with injected
ephemeral keys) and checked here against a second, straight-line computation written
only with hashlib/hmac, coincurve and libsodium, which also produces the key-schedule
trace. RFC 6979 signatures make the wallet signature deterministic too.

Usage:
    python scripts/gen_v2_vectors.py          write tests/vectors/v2/transcript.json
    python scripts/gen_v2_vectors.py --check  exit 1 when the file differs from a fresh run

tests/protocol/test_v2_vectors.py runs the check and compares docs/PROTOCOL_V2.md's
quoted values with the file.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sys
from pathlib import Path
from typing import Any

from coincurve import PrivateKey, PublicKey
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from node.crypto.curve import address_of, eip191_digest  # noqa: E402
from node.crypto.hostkey import HostKey  # noqa: E402
from node.crypto.noise import SECP256K1  # noqa: E402
from node.crypto.secret import SecretBytes  # noqa: E402
from node.protocol.v2 import records as r  # noqa: E402
from node.protocol.v2.client import ClientConnectionV2  # noqa: E402
from node.protocol.v2.server import Send, ServerConnectionV2  # noqa: E402
from node.protocol.v2.session import SessionTerms, signed_text  # noqa: E402

OUT = REPO / "tests" / "vectors" / "v2" / "transcript.json"

HOST_PRIVATE = "21" * 32  # = BOLT 8's responder static key
CLIENT_EPHEMERAL = "12" * 32  # = BOLT 8's initiator ephemeral key
NODE_EPHEMERAL = "22" * 32  # = BOLT 8's responder ephemeral key
WALLET_PRIVATE = "31" * 32
PADDED_CLIENT_EPHEMERAL = "13" * 32
PADDED_NODE_EPHEMERAL = "23" * 32
TERMS = SessionTerms(job_id=42, model="smollm2-135m", price_per_token=2000, chain_id=84532)


# ------------------------------------------------------- the independent computation


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hkdf(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    temp = hmac.digest(ck, ikm, "sha256")
    out1 = hmac.digest(temp, b"\x01", "sha256")
    return out1, hmac.digest(temp, out1 + b"\x02", "sha256")


def _nonce(n: int) -> bytes:
    return bytes(4) + n.to_bytes(8, "little")


def _enc(k: bytes, n: int, ad: bytes, plaintext: bytes) -> bytes:
    return crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _nonce(n), k)


def _dec(k: bytes, n: int, ad: bytes, ciphertext: bytes) -> bytes:
    return crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _nonce(n), k)


def _dh(private_hex: str, public: bytes) -> bytes:
    point = PublicKey(public).multiply(bytes.fromhex(private_hex))
    return _sha256(point.format(compressed=True))


def _public(private_hex: str) -> bytes:
    return PrivateKey(bytes.fromhex(private_hex)).public_key.format(compressed=True)


def handshake_trace(
    payload1: bytes, payload2: bytes, client_e: str, node_e: str
) -> tuple[list[dict[str, str]], dict[str, bytes]]:
    """NK step by step, as PROTOCOL_V2.md section 3 lists it."""
    steps: list[dict[str, str]] = []

    def step(name: str, value: bytes, note: str) -> None:
        steps.append({"step": name, "hex": value.hex(), "what": note})

    name = r.PROTOCOL_NAME.encode("ascii")
    h = _sha256(name)
    step("h0", h, "SHA256(protocol name), the name being 36 bytes > 32")
    ck = h
    h = _sha256(h + r.PROLOGUE)
    step("h_prologue", h, "MixHash(prologue 'llm-node/v2')")
    host_pub = _public(HOST_PRIVATE)
    h = _sha256(h + host_pub)
    step("h_prestatic", h, "MixHash(host static public key): the NK pre-message")
    # message 1: -> e, es
    e_pub = _public(client_e)
    h = _sha256(h + e_pub)
    step("msg1_h_e", h, "MixHash(client ephemeral public key)")
    es = _dh(client_e, host_pub)
    step("msg1_es", es, "DH(client e, host s) = SHA256(compressed point)")
    ck, k = _hkdf(ck, es)
    step("msg1_ck", ck, "MixKey(es): new chaining key")
    step("msg1_k", k, "MixKey(es): key for payload1 (nonce 0)")
    c1 = _enc(k, 0, h, payload1)
    step("msg1_payload_ciphertext", c1, "ENCRYPT(k, 0, h, payload1)")
    h = _sha256(h + c1)
    step("msg1_h", h, "MixHash(ciphertext)")
    msg1 = e_pub + c1
    # message 2: <- e, ee
    re_pub = _public(node_e)
    h = _sha256(h + re_pub)
    step("msg2_h_e", h, "MixHash(node ephemeral public key)")
    ee = _dh(client_e, re_pub)
    step("msg2_ee", ee, "DH(client e, node e)")
    ck, k = _hkdf(ck, ee)
    step("msg2_ck", ck, "MixKey(ee): final chaining key (both directions rotate from it)")
    step("msg2_k", k, "MixKey(ee): key for payload2 (nonce 0)")
    c2 = _enc(k, 0, h, payload2)
    step("msg2_payload_ciphertext", c2, "ENCRYPT(k, 0, h, payload2)")
    h = _sha256(h + c2)
    step("handshake_hash", h, "MixHash(ciphertext): the handshake hash, signed in the session")
    msg2 = re_pub + c2
    k_c2n, k_n2c = _hkdf(ck, b"")
    step("k_client_to_node", k_c2n, "Split(): first key")
    step("k_node_to_client", k_n2c, "Split(): second key")
    return steps, {
        "msg1": msg1,
        "msg2": msg2,
        "h": h,
        "ck": ck,
        "k_c2n": k_c2n,
        "k_n2c": k_n2c,
    }


class PlainCipher:
    """One direction, with BOLT 8 rotation, from the straight-line primitives."""

    def __init__(self, k: bytes, ck: bytes) -> None:
        self.k, self.ck, self.n, self.epoch = k, ck, 0, 0

    def open(self, frame: bytes) -> tuple[int, int, bytes]:
        n, epoch = self.n, self.epoch
        plaintext = _dec(self.k, n, b"", frame)
        self.n += 1
        if self.n == r.REKEY_EVERY:
            self.ck, self.k = _hkdf(self.ck, self.k)
            self.n, self.epoch = 0, self.epoch + 1
        return epoch, n, plaintext


# ---------------------------------------------------------------- the real session


def _send(actions: list[Any]) -> bytes:
    frames = [a.frame for a in actions if isinstance(a, Send)]
    assert len(frames) == 1, actions
    return frames[0]


def _connections(
    padding: int, client_e: str, node_e: str
) -> tuple[HostKey, ServerConnectionV2, ClientConnectionV2]:
    host = HostKey(SecretBytes(bytes.fromhex(HOST_PRIVATE)))
    server = ServerConnectionV2(
        host_key=host,
        clock=lambda: 0.0,
        ephemeral=SECP256K1.keypair(SecretBytes(bytes.fromhex(node_e))),
    )
    client = ClientConnectionV2(
        host.public_key,
        padding=padding,
        ephemeral=SECP256K1.keypair(SecretBytes(bytes.fromhex(client_e))),
    )
    return host, server, client


class Recorder:
    """Checks each frame with :class:`PlainCipher` and keeps the ones to publish."""

    def __init__(self, keys: dict[str, bytes]) -> None:
        self.ciphers = {
            "client_to_node": PlainCipher(keys["k_c2n"], keys["ck"]),
            "node_to_client": PlainCipher(keys["k_n2c"], keys["ck"]),
        }
        self.counts = {"client_to_node": 0, "node_to_client": 0}
        self.frames: list[dict[str, Any]] = []
        self.rotations: list[dict[str, Any]] = []

    def add(self, direction: str, frame: bytes, *, keep: bool = True) -> bytes:
        cipher = self.ciphers[direction]
        epoch_before = cipher.epoch
        epoch, nonce, plaintext = cipher.open(frame)
        index = self.counts[direction]
        self.counts[direction] += 1
        if keep:
            body_len = int.from_bytes(plaintext[1:5], "big")
            self.frames.append(
                {
                    "direction": direction,
                    "record": index,
                    "key_epoch": epoch,
                    "nonce": nonce,
                    "type": r.RECORD_NAMES[plaintext[0]],
                    "body": plaintext[5 : 5 + body_len].decode("utf-8"),
                    "plaintext_hex": plaintext.hex(),
                    "frame_hex": frame.hex(),
                }
            )
        if cipher.epoch != epoch_before:
            self.rotations.append(
                {
                    "direction": direction,
                    "after_records": index + 1,
                    "ck": cipher.ck.hex(),
                    "k": cipher.k.hex(),
                }
            )
        return frame


def _session_section(
    client: ClientConnectionV2, server: ServerConnectionV2, rec: Recorder, wallet: PrivateKey
) -> dict[str, Any]:
    assert client.handshake_hash is not None
    text = signed_text(client.handshake_hash, TERMS)
    frame = rec.add("client_to_node", client.session(TERMS, wallet))
    record_body = rec.frames[-1]["body"]
    signature = json.loads(record_body)["signature"]
    ack = rec.add("node_to_client", _send(server.receive(frame)))
    client.receive(ack)
    return {
        "wallet_private_key": WALLET_PRIVATE,
        "wallet_address": address_of(wallet.public_key),
        "signed_text": text.decode("utf-8"),
        "eip191_digest": eip191_digest(text).hex(),
        "signature": signature,
    }


def build() -> dict[str, Any]:
    wallet = PrivateKey(bytes.fromhex(WALLET_PRIVATE))
    host, server, client = _connections(0, CLIENT_EPHEMERAL, NODE_EPHEMERAL)
    msg1 = client.start()
    msg2 = _send(server.receive(msg1))
    client.receive(msg2)
    payload1 = b"{}"
    payload2 = r.dump_json(
        {"protocol": r.PROTOCOL_ID, "max_record": r.MAX_BODY, "rekey_every": 1000, "padding": 0}
    )
    steps, keys = handshake_trace(payload1, payload2, CLIENT_EPHEMERAL, NODE_EPHEMERAL)
    assert msg1 == keys["msg1"], "engine msg1 differs from the straight-line computation"
    assert msg2 == keys["msg2"], "engine msg2 differs from the straight-line computation"
    assert client.handshake_hash == server.handshake_hash == keys["h"]

    rec = Recorder(keys)
    session = _session_section(client, server, rec, wallet)
    # an answer
    server.receive(rec.add("client_to_node", client.request("r1", prompt="Hello", max_tokens=8)))
    for text in ("Hi", " there"):
        client.receive(rec.add("node_to_client", server.chunk("r1", text, 1)))
    client.receive(rec.add("node_to_client", server.finish("r1", "stop", prompt_tokens=4)))
    # pings until both directions have rotated once; keep the ones around the rotation
    while rec.counts["client_to_node"] < r.REKEY_EVERY + 2:
        keep = rec.counts["client_to_node"] in (2, 998, 999, 1000, 1001)
        ping = rec.add("client_to_node", client.ping(), keep=keep)
        keep = rec.counts["node_to_client"] in (4, 998, 999, 1000, 1001)
        client.receive(rec.add("node_to_client", _send(server.receive(ping)), keep=keep))
    # a refused request, then the client's goodbye
    refused = rec.add("client_to_node", client.request("r2", prompt="Hi", max_tokens=0))
    client.receive(rec.add("node_to_client", _send(server.receive(refused))))
    closing = rec.add("client_to_node", client.close("done"))
    server.receive(closing)
    transcript = {
        "protocol_name": r.PROTOCOL_NAME,
        "prologue": r.PROLOGUE.decode("ascii"),
        "keys": {
            "host_private_key": HOST_PRIVATE,
            "host_public_key": host.public_key.hex(),
            "client_ephemeral_private_key": CLIENT_EPHEMERAL,
            "client_ephemeral_public_key": _public(CLIENT_EPHEMERAL).hex(),
            "node_ephemeral_private_key": NODE_EPHEMERAL,
            "node_ephemeral_public_key": _public(NODE_EPHEMERAL).hex(),
        },
        "handshake": {
            "payload1": payload1.decode("utf-8"),
            "payload2": payload2.decode("utf-8"),
            "msg1_hex": msg1.hex(),
            "msg2_hex": msg2.hex(),
            "steps": steps,
        },
        "session": session,
        "records": rec.frames,
        "rotations": rec.rotations,
        "record_counts": dict(rec.counts),
        "padded": _padded_session(wallet),
    }
    return transcript


def _padded_session(wallet: PrivateKey) -> dict[str, Any]:
    """A second session with padding 64: handshake, session, ack, one chunk, END and
    the node's CLOSE record."""
    _, server, client = _connections(64, PADDED_CLIENT_EPHEMERAL, PADDED_NODE_EPHEMERAL)
    msg1 = client.start()
    msg2 = _send(server.receive(msg1))
    client.receive(msg2)
    payload2 = r.dump_json(
        {"protocol": r.PROTOCOL_ID, "max_record": r.MAX_BODY, "rekey_every": 1000, "padding": 64}
    )
    _, keys = handshake_trace(
        b'{"padding":64}', payload2, PADDED_CLIENT_EPHEMERAL, PADDED_NODE_EPHEMERAL
    )
    assert (msg1, msg2) == (keys["msg1"], keys["msg2"])
    rec = Recorder(keys)
    _session_section(client, server, rec, wallet)
    server.receive(rec.add("client_to_node", client.request("p1", prompt="Hello")))
    client.receive(rec.add("node_to_client", server.chunk("p1", "Hi", 1)))
    client.receive(rec.add("node_to_client", server.finish("p1", "stop", prompt_tokens=2)))
    goodbye = server.goodbye("server shutdown")
    assert goodbye is not None
    client.receive(rec.add("node_to_client", goodbye))
    return {
        "padding": 64,
        "client_ephemeral_private_key": PADDED_CLIENT_EPHEMERAL,
        "node_ephemeral_private_key": PADDED_NODE_EPHEMERAL,
        "payload1": '{"padding":64}',
        "payload2": payload2.decode("utf-8"),
        "msg1_hex": msg1.hex(),
        "msg2_hex": msg2.hex(),
        "handshake_hash": keys["h"].hex(),
        "records": rec.frames,
    }


def render(transcript: dict[str, Any]) -> str:
    return json.dumps(transcript, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render(build())
    if args.check:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT.relative_to(REPO)} is out of date; run scripts/gen_v2_vectors.py")
            return 1
        print(f"{OUT.relative_to(REPO)} is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
