#!/usr/bin/env python3
# ruff: noqa: E501  (the mutants quote whole source lines exactly)
"""Hand-made mutants of the security-critical lines of issue 14: each must fail its tests.

    .venv/bin/python scripts/mutants_issue14.py [NAME-FRAGMENT ...] [--json PATH]

Each mutant replaces one exact piece of a source file, runs the tests named with it
(``pytest -x``), and puts the file back (also on Ctrl-C or SIGTERM). "killed" means the
tests failed, as they must. It edits this checkout's files while it runs: run nothing
else in the checkout meanwhile. Prints one line per mutant and the kill rate.

Two mutants are known to survive because they cannot change behaviour (equivalent):
"continues ignores encrypted" (a plaintext session never has a client address, so the
address clause already fails) and "key not wiped when data not an object" (a key is only
taken from a top-level object, which always parses to a dict; the wipe is defensive).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
S = "tests/security"
LIN = f"{S}/test_linear_parsing.py"
GAPS = f"{S}/test_review_gaps.py"
MEM = f"{S}/test_session_memory.py"
ORI = f"{S}/test_origin_and_challenge.py"
KEYP = "tests/crypto/test_session_key_parse.py"
COPIES = f"{S}/test_session_key_copies.py"
SIE = "tests/crypto/test_session_init_errors.py"
DEEP = f"{S}/test_deep_json.py tests/protocol/test_decode_errors.py"
HOST = "tests/client/test_hostile_node.py"

M = [
    # finding 1
    (
        "enc: backtracking string pattern",
        "node/crypto/encoding.py",
        """_JSON_STRING = re.compile(r'"[^"\\\\]*+(?:\\\\.[^"\\\\]*+)*+(?:"|\\\\?\\Z)', re.DOTALL)""",
        """_JSON_STRING = re.compile(r'"(?:[^"\\\\]|\\\\.)*"', re.DOTALL)""",
        f"{LIN} -k reviewer",
    ),
    (
        "enc: depth > allowed+1",
        "node/crypto/encoding.py",
        "            if depth > allowed:",
        "            if depth > allowed + 1:",
        f"{LIN} -k definition",
    ),
    (
        "enc: allowed ignores passes",
        "node/crypto/encoding.py",
        "    allowed = limit - removed",
        "    allowed = limit",
        f"{LIN} {DEEP}",
    ),
    (
        "enc: no negative check",
        "node/crypto/encoding.py",
        "            if depth < 0:\n                return True  # a closer",
        "            if False:\n                return True  # a closer",
        f"{LIN} -k definition",
    ),
    (
        "enc: final balance ignored",
        "node/crypto/encoding.py",
        "    return depth != 0\n",
        "    return False\n",
        f"{LIN} -k definition",
    ),
    (
        "enc: count shortcut off by many",
        "node/crypto/encoding.py",
        'if text.count("[") + text.count("{") <= limit:',
        'if text.count("[") + text.count("{") <= limit * 2:',
        f"{LIN} -k 'definition or depth_is' {DEEP}",
    ),
    (
        "msg: error carries no id",
        "node/protocol/messages.py",
        "        error.request_id = _echo_id(obj)\n",
        "",
        f"{LIN} -k once",
    ),
    (
        "driver: re-parse for the id",
        "node/server/driver.py",
        "state.reject(exc, exc.request_id)",
        "state.reject(exc, __import__('node.protocol.messages', fromlist=['x']).request_id_of(frame))",
        f"{LIN} -k once",
    ),
    # finding 2
    (
        "si: session data size check off",
        "node/crypto/session_init.py",
        "    if len(init.ciphertext) - aead.TAG_SIZE > MAX_SESSION_DATA_BYTES:",
        "    if len(init.ciphertext) - aead.TAG_SIZE > MAX_SESSION_DATA_BYTES * 64:",
        MEM,
    ),
    (
        "si: model length check off",
        "node/crypto/session_init.py",
        "    if len(value) > MAX_MODEL_NAME_CHARS:",
        "    if len(value) > MAX_MODEL_NAME_CHARS * 2:",
        MEM,
    ),
    (
        "si: vdb size check off",
        "node/crypto/session_init.py",
        "    if len(text) > MAX_VECTOR_DATABASE_BYTES:",
        "    if len(text) > MAX_VECTOR_DATABASE_BYTES * 64:",
        MEM,
    ),
    (
        "conn: per-connection budget off",
        "node/protocol/connection.py",
        "        if self.session_bytes - freed + cost > self.config.max_session_bytes:",
        "        if False:",
        MEM,
    ),
    (
        "conn: node budget off",
        "node/protocol/connection.py",
        "        if cost > freed and not self.memory.reserve(cost - freed):",
        "        if False:",
        f"{MEM} {GAPS}",
    ),
    (
        "conn: close releases nothing",
        "node/protocol/connection.py",
        "            session.wipe()\n            self._release(session)\n",
        "            session.wipe()\n",
        MEM,
    ),
    (
        "conn: drop releases nothing",
        "node/protocol/connection.py",
        "        session.wipe()\n        self._release(session)\n",
        "        session.wipe()\n",
        MEM,
    ),
    (
        "conn: replaced reservation not freed",
        "node/protocol/connection.py",
        "        freed = replacing.cost if replacing is not None else 0",
        "        freed = 0",
        MEM,
    ),
    (
        "conn: plaintext free of charge",
        "node/protocol/connection.py",
        "            self._reserve(SESSION_OVERHEAD_BYTES, old)\n",
        "",
        MEM,
    ),
    # finding 5
    (
        "app: challenge flag ignored",
        "node/server/app.py",
        "        if not ctx.config.v1_challenge:",
        "        if False:",
        ORI,
    ),
    # finding 8
    (
        "si: surrogate in modelName",
        "node/crypto/session_init.py",
        """    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate""",
        """    try:
        pass
    except UnicodeEncodeError:  # a lone surrogate""",
        GAPS,
    ),
    (
        "msg: surrogate in id",
        "node/protocol/messages.py",
        '        check_text(value, "id")\n',
        "",
        GAPS,
    ),
    (
        "msg: surrogate in prompt model",
        "node/protocol/messages.py",
        '        check_text(model, "model")\n',
        "",
        GAPS,
    ),
    (
        "req: surrogate in request model",
        "node/protocol/requests.py",
        '        _text(model, "model")\n',
        "",
        GAPS,
    ),
    (
        "client: surrogate in frame",
        "node/client/frames.py",
        '        value.encode("utf-8")\n    except UnicodeEncodeError:  # a lone surrogate',
        "        pass\n    except UnicodeEncodeError:  # a lone surrogate",
        GAPS,
    ),
    # finding 9
    (
        "si: digits not zeroed",
        "node/crypto/session_init.py",
        '    buf[start:end] = b"0" * (end - start)\n',
        "",
        f"{KEYP} {COPIES}",
    ),
    (
        "si: duplicates allowed",
        "node/crypto/session_init.py",
        "    if seen > 1:\n        raise",
        "    if seen > 99:\n        raise",
        KEYP,
    ),
    (
        "si: hex digit formula",
        "node/crypto/session_init.py",
        "    return (c & 0x0F) + 9 * (c >> 6)",
        "    return (c & 0x0F) + 10 * (c >> 6)",
        f"{KEYP} {SIE}",
    ),
    (
        "si: hex not validated",
        "node/crypto/session_init.py",
        "    if _KEY_HEX.fullmatch(buf, start, end) is None:\n        return None",
        "    if end - start not in (64, 66):\n        return None",
        f"{KEYP} {SIE}",
    ),
    (
        "si: later duplicate accepted",
        "node/crypto/session_init.py",
        """        if not isinstance(key_hex, str) or not constant_time_equal(""",
        """        if not isinstance(key_hex, str) and not constant_time_equal(""",
        KEYP,
    ),
    (
        "si: plaintext not wiped",
        "node/crypto/session_init.py",
        "    finally:\n        plaintext.wipe()\n",
        "    finally:\n        pass\n",
        f"{SIE} {KEYP}",
    ),
    (
        "si: key not wiped when data not an object",
        "node/crypto/session_init.py",
        """    if not isinstance(data, dict):
        if key is not None:
            key.wipe()""",
        """    if not isinstance(data, dict):
        if key is not None:
            pass""",
        f"{SIE} {KEYP}",
    ),
    (
        "si: key not wiped when not JSON",
        "node/crypto/session_init.py",
        """    except (UnicodeDecodeError, ValueError):
        if key is not None:
            key.wipe()""",
        """    except (UnicodeDecodeError, ValueError):
        if key is not None:
            pass""",
        f"{SIE} {KEYP}",
    ),
    (
        "si: key not wiped on later duplicate",
        "node/crypto/session_init.py",
        """            # json.loads kept another member (a later, escaped spelling of the name)
            key.wipe()""",
        """            # json.loads kept another member (a later, escaped spelling of the name)
            pass""",
        f"{SIE} {KEYP}",
    ),
    # finding 11
    (
        "app: origin not checked",
        "node/server/app.py",
        '                if not origin_allowed(self.ctx.config, request.headers.get("origin")):',
        "                if False:",
        ORI,
    ),
    (
        "app: loopback allows all",
        "node/server/app.py",
        "        return not is_loopback_host(config.host)",
        "        return True",
        ORI,
    ),
    (
        "app: star ignored",
        "node/server/app.py",
        '    return "*" in allowed or normalize_origin(origin) in allowed',
        "    return normalize_origin(origin) in allowed",
        ORI,
    ),
    (
        "app: origin not normalized",
        "node/server/app.py",
        '    return "*" in allowed or normalize_origin(origin) in allowed',
        '    return "*" in allowed or origin in allowed',
        ORI,
    ),
    (
        "config: ::1 not loopback",
        "node/config.py",
        '        return ipaddress.ip_address(host.strip("[]")).is_loopback',
        "        return ipaddress.ip_address(host).is_loopback",
        ORI,
    ),
    # finding 12
    (
        "conn: allow-list ignores plaintext",
        "node/protocol/connection.py",
        "            and not self.config.allow_plaintext_with_allowlist\n",
        "            and False\n",
        GAPS,
    ),
    (
        "conn: plaintext flag ignored",
        "node/protocol/connection.py",
        "            self.config.allowed_clients is not None\n            and not self.config.allow_plaintext_with_allowlist",
        "            self.config.allowed_clients is not None",
        GAPS,
    ),
    (
        "ctx: flag not passed",
        "node/server/context.py",
        "            allow_plaintext_with_allowlist=c.allow_plaintext_with_allowlist,\n",
        "",
        GAPS,
    ),
    # finding 13
    (
        "conn: keys_held counts plaintext",
        "node/protocol/connection.py",
        "        return sum(1 for s in self.sessions.values() if s.key is not None and not s.key.wiped)",
        "        return sum(1 for s in self.sessions.values())",
        GAPS,
    ),
    (
        "metrics: key bytes",
        "node/server/driver.py",
        '        return ("v1", keys, keys * aead.KEY_SIZE, enc, len(s.sessions) - enc)',
        '        return ("v1", keys, len(s.sessions) * aead.KEY_SIZE, enc, len(s.sessions) - enc)',
        GAPS,
    ),
    (
        "conn: continues ignores encrypted",
        "node/protocol/connection.py",
        "            and old.encrypted\n",
        "",
        GAPS,
    ),
    (
        "conn: continues ignores job",
        "node/protocol/connection.py",
        "            and old.job_id == data.job_id\n",
        "",
        GAPS,
    ),
    (
        "conn: continues ignores chain",
        "node/protocol/connection.py",
        "            and old.chain_id == message.chain_id\n",
        "",
        GAPS,
    ),
    (
        "conn: continues ignores client",
        "node/protocol/connection.py",
        "            and constant_time_equal(old.client_address.encode(), data.client_address.encode())\n",
        "",
        GAPS,
    ),
    (
        "conn: continues ignores price",
        "node/protocol/connection.py",
        "            and old.price_per_token == data.price_per_token\n",
        "",
        GAPS,
    ),
    (
        "conn: continues ignores model",
        "node/protocol/connection.py",
        "            and old.model_name == data.model_name\n",
        "",
        GAPS,
    ),
    (
        "conn: refused key not wiped",
        "node/protocol/connection.py",
        "        except BaseException:\n            data.session_key.wipe()\n            raise",
        "        except BaseException:\n            raise",
        GAPS,
    ),
    (
        "client: ack address only null-checked",
        "node/client/session.py",
        "            if frame.client_address is None or not constant_time_equal(",
        "            if frame.client_address is None or not True or constant_time_equal(",
        HOST + " -k ack_naming",
    ),
]


def survives(tests: str) -> bool:
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "error"]
    result = subprocess.run(
        [*command, *tests.split()], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    return result.returncode == 0


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="run the mutants whose name contains these")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    rows: list[dict[str, object]] = []
    for name, path, old, new, tests in M:
        if args.only and not any(o in name for o in args.only):
            continue
        source = ROOT / path
        text = source.read_text(encoding="utf-8")
        if text.count(old) != 1:
            rows.append({"mutant": name, "status": "not applied"})
            print(f"not applied  {name}", flush=True)
            continue
        started = time.perf_counter()
        source.write_text(text.replace(old, new), encoding="utf-8")
        try:
            status = "survived" if survives(tests) else "killed"
        finally:
            source.write_text(text, encoding="utf-8")
        rows.append({"mutant": name, "status": status})
        print(f"{status:12} {name} ({time.perf_counter() - started:.0f} s)", flush=True)
    applied = [r for r in rows if r["status"] != "not applied"]
    killed = sum(r["status"] == "killed" for r in applied)
    print(f"killed {killed} of {len(applied)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
