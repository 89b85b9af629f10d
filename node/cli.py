"""The ``llm-node`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from node import __version__
from node.crypto.errors import HostKeyError
from node.crypto.hostkey import ENV_VAR, HostKey


def _cmd_keygen(args: argparse.Namespace) -> int:
    key = HostKey.generate()
    try:
        if args.json:
            print(
                json.dumps(
                    {
                        "private_key": key.private_key_hex(),
                        "public_key": key.public_key_hex,
                        "address": key.address,
                    }
                )
            )
        else:
            print(f"{ENV_VAR}={key.private_key_hex()}")
            print(f"public key: {key.public_key_hex}")
            print(f"address:    {key.address}")
            print(
                f"Keep the private key secret; start the node with {ENV_VAR} set in its "
                "environment.",
                file=sys.stderr,
            )
    finally:
        key.wipe()
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    try:
        key = HostKey.from_env()
    except HostKeyError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    if key is None:
        print(f"error: {ENV_VAR} is not set (this node would run plaintext-only)", file=sys.stderr)
        return 2
    try:
        if args.json:
            print(json.dumps({"public_key": key.public_key_hex, "address": key.address}))
        else:
            print(f"public key: {key.public_key_hex}")
            print(f"address:    {key.address}")
    finally:
        key.wipe()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-node", description="End-to-end encrypted LLM host node."
    )
    parser.add_argument("--version", action="version", version=f"llm-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create a new host key and print it with its address")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("pubkey", help=f"print the public key and address of {ENV_VAR}")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_pubkey)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
