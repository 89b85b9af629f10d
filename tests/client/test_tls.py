"""``llm-node chat`` against a node behind TLS signed by a private CA (``--ca-file``).

The CA and the server certificate are made with the ``openssl`` program for each run;
the node is served over ``trio.serve_ssl_over_tcp`` in this test's Trio run, and the
chat command runs as a subprocess.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import trio

from node.client.discovery import connection_failure_cause, tls_context
from tests.conftest import REPO_ROOT
from tests.server._support import build_node

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test CA",
             "-days", "2", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign", cwd=d)  # fmt: skip
    _openssl("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1",
             cwd=d)  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n", encoding="ascii")
    _openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "node.pem", "-days", "2", "-extfile", "ext.cnf",
             cwd=d)  # fmt: skip
    return d


async def _chat(port: int, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "node", "chat", "--url", f"https://127.0.0.1:{port}",
         "--job-id", "5", *extra, "over tls"],
        cwd=REPO_ROOT,
        env={k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )  # fmt: skip


async def test_chat_over_tls_with_a_private_ca(certificates: Path) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(certificates / "node.pem", certificates / "node.key")
    node = build_node()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(
                    trio.serve_ssl_over_tcp,
                    node.server.handle_stream,
                    0,
                    server_context,
                    host="127.0.0.1",
                    https_compatible=True,
                )
            )
            port = listeners[0].transport_listener.socket.getsockname()[1]
            refused = await _chat(port)
            trusted = await _chat(port, "--ca-file", str(certificates / "ca.pem"))
            nursery.cancel_scope.cancel()
    err = refused.stderr.decode()
    assert refused.returncode == 1
    assert "error [CONNECT_FAILED]" in err
    assert "TLS certificate verification failed" in err
    assert "--ca-file" in err
    assert "ConnectError" not in err
    assert trusted.returncode == 0, trusted.stderr.decode()
    assert trusted.stdout.decode() == "over tls\n"


def test_a_bad_ca_file_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("hello\n", encoding="ascii")
    with pytest.raises(ValueError, match=r"cannot use .* as CA certificates"):
        tls_context(str(bad))
    assert tls_context(None) is None
    result = subprocess.run(
        [sys.executable, "-m", "node", "chat", "--ca-file", str(bad), "hi"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--ca-file: cannot use" in result.stderr


def test_connection_failure_causes_are_named() -> None:
    verify = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] x")
    verify.verify_message = "self-signed certificate"
    wrapper = ConnectionError("outer")
    wrapper.__cause__ = verify
    assert "self-signed certificate" in connection_failure_cause(wrapper)
    refused = ConnectionRefusedError(111, "Connection refused")
    assert connection_failure_cause(refused) == "Connection refused"
    assert connection_failure_cause(RuntimeError("x")) == "RuntimeError"
