"""The pool of pre-generated ephemeral keys: each key handed out once, wiped after use,
wiped with the pool, never shown."""

from __future__ import annotations

import pickle
import threading
import time
from typing import Any

import pytest
from coincurve import PrivateKey

from node.crypto.hostkey import HostKey
from node.crypto.noise import SECP256K1, EphemeralPool, HandshakeState, KeyPair, Rng
from node.protocol.v2 import ClientConnectionV2, Send, ServerConnectionV2, SessionTerms
from node.protocol.v2 import records as r

HOST = HostKey.parse("0x" + "11" * 32)


class RecordingDH:
    """SECP256K1, remembering every key pair it generates (and optionally acting
    between generating a key and returning it)."""

    name = SECP256K1.name
    public_key_len = SECP256K1.public_key_len
    dh_len = SECP256K1.dh_len

    def __init__(self, during: Any = None) -> None:
        self.made: list[KeyPair] = []
        self.during = during

    def generate_keypair(self, rng: Rng) -> KeyPair:
        key = SECP256K1.generate_keypair(rng)
        self.made.append(key)
        if self.during is not None:
            self.during()
        return key

    def keypair(self, private: Any) -> KeyPair:  # pragma: no cover - not used by the pool
        return SECP256K1.keypair(private)

    def parse_public(self, data: bytes) -> Any:  # pragma: no cover
        return SECP256K1.parse_public(data)

    def dh(self, keypair: KeyPair, public: Any) -> Any:  # pragma: no cover
        return SECP256K1.dh(keypair, public)


def test_each_key_is_handed_out_once_then_the_pool_is_empty() -> None:
    pool = EphemeralPool(8)
    assert (len(pool), pool.missing) == (0, 8)
    assert pool.take() is None
    assert pool.fill() == 8
    assert pool.fill() == 0  # full
    taken = [pool.take() for _ in range(8)]
    assert pool.take() is None
    assert all(k is not None for k in taken)
    publics = {k.public for k in taken if k is not None}
    assert len(publics) == 8
    assert len({id(k) for k in taken}) == 8
    assert pool.fill(max_new=3) == 3
    again = [pool.take() for _ in range(3)]
    assert not publics & {k.public for k in again if k is not None}


def test_no_key_is_handed_out_twice_while_a_thread_fills() -> None:
    pool = EphemeralPool(16)
    seen: list[KeyPair] = []
    stop = threading.Event()

    def filler() -> None:
        while not stop.is_set():
            pool.fill()

    thread = threading.Thread(target=filler)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(seen) < 500 and time.monotonic() < deadline:
            key = pool.take()
            if key is not None:
                seen.append(key)
    finally:
        stop.set()
        thread.join()
    assert len(seen) >= 50
    assert len({k.public for k in seen}) == len(seen)
    assert len({id(k) for k in seen}) == len(seen)
    pool.wipe()


def test_wipe_zeroes_every_pooled_key_and_closes_the_pool() -> None:
    dh = RecordingDH()
    pool = EphemeralPool(5, dh=dh)
    pool.fill()
    handed = pool.take()
    assert handed is not None
    pool.wipe()
    assert pool.closed
    held = [k for k in dh.made if k is not handed]
    assert len(held) == 4
    assert all(k.private.wiped for k in held)
    assert not handed.private.wiped  # the caller's, wiped by its handshake
    assert pool.take() is None
    assert (pool.fill(), pool.missing, len(pool)) == (0, 0, 0)
    pool.wipe()  # twice is fine


def test_a_key_made_while_the_pool_closes_is_wiped() -> None:
    pool: EphemeralPool

    def close_now() -> None:
        pool.wipe()

    dh = RecordingDH(during=close_now)
    pool = EphemeralPool(3, dh=dh)
    assert pool.fill() == 0
    [key] = dh.made
    assert key.private.wiped
    assert pool.take() is None


def test_the_pool_never_shows_its_keys() -> None:
    dh = RecordingDH()
    pool = EphemeralPool(2, dh=dh)
    pool.fill()
    text = repr(pool) + str(pool)
    assert "redacted" in text
    for key in dh.made:
        assert key.private.reveal().hex() not in text
        assert key.private.reveal().hex() not in repr(key)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(pool)
    with pytest.raises(ValueError, match="at least one key"):
        EphemeralPool(0)


def _handshake(server: ServerConnectionV2) -> bytes:
    client = ClientConnectionV2(HOST.public_key)
    (reply,) = server.receive(client.start())
    assert isinstance(reply, Send)
    client.receive(reply.frame)
    key = PrivateKey()
    terms = SessionTerms(job_id=1, model="m", price_per_token=1, chain_id=1)
    server.receive(client.session(terms, key))
    return reply.frame


def test_a_pooled_key_serves_one_handshake_and_is_wiped_by_it() -> None:
    pool = EphemeralPool(2)
    pool.fill()
    first, second = pool.take(), pool.take()
    assert first is not None
    assert second is not None
    msg2 = _handshake(ServerConnectionV2(host_key=HOST, clock=time.monotonic, ephemeral=first))
    assert msg2[:33] == first.public  # the node's e in message 2 is the pooled key
    assert first.private.wiped
    # a failed handshake wipes its pooled key too
    server = ServerConnectionV2(host_key=HOST, clock=time.monotonic, ephemeral=second)
    server.receive(b"\x02" + bytes(32 + 16))
    assert server.closed
    assert second.private.wiped
    # the next handshake does not get either key again
    msg2b = _handshake(ServerConnectionV2(host_key=HOST, clock=time.monotonic))
    assert msg2b[:33] not in (first.public, second.public)


def test_precomputed_initial_hash_matches_the_spec_and_the_host_key() -> None:
    import hashlib

    other = HostKey.parse("0x" + "22" * 32)
    name = b"Noise_NK_secp256k1_ChaChaPoly_SHA256"
    for host in (HOST, other):
        h = hashlib.sha256(name).digest()
        h = hashlib.sha256(h + r.PROLOGUE).digest()
        h = hashlib.sha256(h + host.public_key).digest()
        hs = HandshakeState(
            "NK", initiator=False, dh=SECP256K1, prologue=r.PROLOGUE, s=host.noise_keypair()
        )
        assert hs.symmetric.h == h
        assert hs.symmetric.ck.reveal() == hashlib.sha256(name).digest()
