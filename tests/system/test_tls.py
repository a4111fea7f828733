"""TLS in the hub: ``--tls-cert``/``--tls-key`` make the one port speak ``wss://`` and
``https://`` (the probes too), with one process or with ``--workers``.

The certificate is self-signed for 127.0.0.1, made in the test with ``cryptography``; the
clients trust exactly that certificate. Bad TLS settings are configuration errors: exit 2
and one line naming the file.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.exceptions import InvalidHandshake

from tests.helpers import (
    config_error,
    free_port,
    open_ws,
    recv_json,
    run_cli,
    subscribe,
    wait_until,
)


def write_self_signed(directory: Path, name: str = "hub") -> tuple[Path, Path]:
    """A certificate for IP 127.0.0.1 (valid for a day) and its unencrypted key, as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
            ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def tls_files(tmp_path) -> tuple[Path, Path, ssl.SSLContext]:
    """``(cert, key, a client context that trusts exactly that certificate)``."""
    cert, key = write_self_signed(tmp_path)
    return cert, key, ssl.create_default_context(cafile=str(cert))


def https_get(port: int, path: str, context: ssl.SSLContext) -> tuple[int | None, bytes]:
    """``(status, body)`` of ``GET https://127.0.0.1:port/path``; ``(None, b"")`` when nothing
    answers over TLS."""
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", timeout=2,
                                    context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return None, b""


def start_tls_hub(hub_factory, cert: Path, key: Path, context: ssl.SSLContext, *args: str,
                  redis=None):
    hub = hub_factory("--tls-cert", str(cert), "--tls-key", str(key), *args, redis=redis,
                      wait_ready=False)

    def ready() -> bool:
        if hub.proc.poll() is not None:
            raise AssertionError(f"hub exited with {hub.proc.returncode}:\n{hub.log_text()}")
        return https_get(hub.port, "/readyz", context)[0] == 200

    wait_until(ready, 15, what="the hub's /readyz over https")
    return hub


async def test_a_tls_hub_serves_wss_and_https_probes(tls_files, redis_server, hub_factory):
    cert, key, context = tls_files
    hub = start_tls_hub(hub_factory, cert, key, context, redis=redis_server)
    assert https_get(hub.port, "/healthz", context) == (200, b"OK\n")

    async with open_ws(f"wss://127.0.0.1:{hub.port}/ws", ssl=context) as ws:
        await subscribe(ws, "news")
        assert redis_server.client().publish("hub:news", json.dumps({"n": 1})) == 1
        assert await recv_json(ws) == {"type": "message", "channel": "news", "data": {"n": 1}}

    # The port speaks TLS only: plain ws:// and http:// get no answer.
    with pytest.raises((InvalidHandshake, OSError)):
        async with open_ws(hub.ws_url, open_timeout=5):
            pass
    assert hub.http_get("/healthz") == (None, b"")
    # A client that does not trust the certificate is refused by its own TLS check.
    with pytest.raises(ssl.SSLCertVerificationError):
        async with open_ws(f"wss://127.0.0.1:{hub.port}/ws", ssl=ssl.create_default_context()):
            pass
    assert "with TLS" in hub.log_text()


async def test_tls_with_workers(tls_files, redis_server, hub_factory):
    cert, key, context = tls_files
    hub = start_tls_hub(hub_factory, cert, key, context, "--workers", "2", redis=redis_server)
    clients = [await open_ws(f"wss://127.0.0.1:{hub.port}/ws", ssl=context) for _ in range(8)]
    try:
        for ws in clients:
            await subscribe(ws, "news")
        redis = redis_server.client()
        assert redis.publish("hub:news", json.dumps({"n": 2})) >= 1
        for ws in clients:
            assert await recv_json(ws) == {"type": "message", "channel": "news",
                                           "data": {"n": 2}}
    finally:
        await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)
    assert https_get(hub.port, "/healthz", context)[0] == 200


# -- configuration errors -------------------------------------------------------------------------

WORKERS = ["--workers", "2", "--redis-url", "redis://127.0.0.1:1/0"]


@pytest.mark.parametrize("given", ["--tls-cert", "--tls-key"])
def test_cert_and_key_go_together(tmp_path, given):
    cert, _ = write_self_signed(tmp_path)
    line = config_error(run_cli("serve", "--port", str(free_port()), given, str(cert)))
    assert line == "hub: --tls-cert and --tls-key go together: give both or neither"


def test_the_variables_are_read(tmp_path):
    line = config_error(run_cli("serve", "--port", str(free_port()),
                                env={"HUB_TLS_KEY": str(tmp_path / "k.pem")}))
    assert "--tls-cert and --tls-key go together" in line


@pytest.mark.parametrize("workers", [[], WORKERS], ids=["one process", "workers"])
@pytest.mark.parametrize("case", ["missing cert", "missing key", "garbage cert", "garbage key",
                                  "key as cert", "other key"])
def test_an_unusable_tls_file_exits_2_naming_it(tmp_path, case, workers):
    cert, key = write_self_signed(tmp_path)
    _, other_key = write_self_signed(tmp_path, "other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    missing = tmp_path / "missing.pem"
    cert_arg, key_arg, expect = {
        "missing cert": (missing, key, f"--tls-cert {missing}: cannot read it: No such file"),
        "missing key": (cert, missing, f"--tls-key {missing}: cannot read it: No such file"),
        "garbage cert": (garbage, key, f"--tls-cert {garbage}: no PEM certificate in it"),
        "garbage key": (cert, garbage, f"--tls-key {garbage}: no PEM private key in it"),
        "key as cert": (key, cert, f"--tls-cert {key}: no PEM certificate in it"),
        "other key": (cert, other_key, (f"--tls-key {other_key} is not the key of the "
                                        f"certificate in --tls-cert {cert}")),
    }[case]
    line = config_error(run_cli("serve", "--port", str(free_port()), "--tls-cert", str(cert_arg),
                                "--tls-key", str(key_arg), *workers))
    assert line.startswith(f"hub: {expect}"), line


def test_an_encrypted_key_exits_2(tmp_path):
    cert, key = write_self_signed(tmp_path)
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    key.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    line = config_error(run_cli("serve", "--port", str(free_port()), "--tls-cert", str(cert),
                                "--tls-key", str(key)))
    assert line == f"hub: --tls-key {key}: the key is encrypted; give an unencrypted one"
