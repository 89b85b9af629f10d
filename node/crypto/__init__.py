"""Pure cryptographic core: functions over bytes, no Trio, no I/O."""

from node.crypto.aead import open as aead_open
from node.crypto.aead import seal as aead_seal
from node.crypto.curve import address_of, parse_public_key, recover_public_key
from node.crypto.errors import ErrorCode, NodeError
from node.crypto.hostkey import HostKey
from node.crypto.kdf import hkdf_sha256
from node.crypto.secret import SecretBytes, constant_time_equal
from node.crypto.session_init import (
    InitPayload,
    SessionData,
    open_session_init,
    parse_init_payload,
    seal_session_init,
)


def derive_shared_key(peer_public_key: bytes, host_key: HostKey) -> SecretBytes:
    """ECDH x-coordinate -> HKDF-SHA256 (zero salt, empty info) -> 32-byte key.

    Accepts 33- and 65-byte SEC1 keys; raises ``InvalidPublicKey`` otherwise.
    """
    from node.crypto.kdf import hkdf_sha256_fast32

    shared, _ = host_key.ecdh_x_sec1(peer_public_key)
    with shared:
        return SecretBytes.take(hkdf_sha256_fast32(shared.live_buffer()))


__all__ = [
    "ErrorCode",
    "HostKey",
    "InitPayload",
    "NodeError",
    "SecretBytes",
    "SessionData",
    "address_of",
    "aead_open",
    "aead_seal",
    "constant_time_equal",
    "derive_shared_key",
    "hkdf_sha256",
    "open_session_init",
    "parse_init_payload",
    "parse_public_key",
    "recover_public_key",
    "seal_session_init",
]
