"""docs/deploy.md for real: a coordinator behind Debian's nginx with TLS, the shipped site
file (deploy/nginx-idlegrid.conf) with only its ports and paths swapped, a self-signed CA
made here. A provider joins through nginx (HTTPS and its agent channel over `wss://`),
and the official `openai` client gets a completion and a streamed one through it.

nginx comes from Debian (`apt-get install nginx`; .ci/run installs it). With
IDLEGRID_REQUIRE_NGINX set (CI) its absence fails the test instead of skipping it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from idlegrid.client.localgrid import LocalGrid
from idlegrid.testbed.inprocess import free_port, wait_until

pytestmark = pytest.mark.slow
SITE = Path(__file__).resolve().parents[2] / "deploy" / "nginx-idlegrid.conf"
MODEL = "fake:1"
CHANNEL = "/api/v1/nodes/channel"


def _nginx() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
    )
    if found is None:
        message = "nginx is not installed (apt-get install nginx; .ci/run does)"
        if os.environ.get("IDLEGRID_REQUIRE_NGINX"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _certificates(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 and localhost: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def build(
        subject: str,
        issuer: x509.Name | None,
        key: ec.EllipticCurvePrivateKey,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            b = b.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
        else:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return b.sign(signer, hashes.SHA256())

    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = build("idlegrid test CA", None, ca_key, ca_key, ca=True)
    leaf = build("127.0.0.1", ca.subject, leaf_key, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    key_path.write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


def _site(upstream_port: int, https_port: int, http_port: int, cert: Path, key: Path) -> str:
    """The shipped site file, pointed at this test's ports and certificate."""
    text = SITE.read_text()
    swaps = {
        "server 127.0.0.1:8700;": f"server 127.0.0.1:{upstream_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "listen [::]:443 ssl;": "",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen [::]:80;": "",
        "/etc/letsencrypt/live/grid.example.org/fullchain.pem": str(cert),
        "/etc/letsencrypt/live/grid.example.org/privkey.pem": str(key),
    }
    for old, new in swaps.items():
        assert text.count(old) == 1, f"{SITE.name} no longer has {old!r} once"
        text = text.replace(old, new)
    return text


@dataclass
class Proxy:
    url: str
    access_log: Path
    error_log: Path


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[tuple[Proxy, Path, int]]:
    """nginx in front of port `upstream` (a coordinator started later): (proxy, CA, port)."""
    binary = _nginx()
    prefix = tmp_path / "nginx"
    (prefix / "temp").mkdir(parents=True)
    ca, cert, key = _certificates(tmp_path)
    upstream, https_port = free_port(), free_port()
    (prefix / "idlegrid.conf").write_text(_site(upstream, https_port, free_port(), cert, key))
    temps = " ".join(
        f"{kind}_temp_path {prefix / 'temp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx's workers would run as nobody, who cannot enter pytest's private tmp
    # (large request bodies are spooled there); Debian's own layout has www-data dirs.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
{user}
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    log_format rid '$remote_addr "$request" $status $request_id';
    access_log {prefix / "access.log"} rid;
    {temps}
    include {prefix / "idlegrid.conf"};
}}
"""
    )
    args = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    check = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = Proxy(f"https://127.0.0.1:{https_port}", prefix / "access.log", prefix / "error.log")
    try:
        yield proxy, ca, upstream
    finally:
        proc.terminate()  # SIGTERM: nginx's fast shutdown
        proc.wait(timeout=30)


def _log(grid: LocalGrid, name: str) -> list[dict[str, Any]]:
    """A process's JSON log lines (each must parse), less LocalGrid's start markers."""
    return [
        json.loads(line)
        for line in grid.log_tail(name, 10_000).splitlines()
        if line.strip() and not line.startswith("----")
    ]


def _answers(url: str, ca: Path) -> bool:
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=ca), timeout=5) as c:
            return c.get(f"{url}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_a_provider_joins_over_wss_and_openai_answers_through_nginx(
    tmp_path: Path, nginx: tuple[Proxy, Path, int]
) -> None:
    proxy, ca, upstream = nginx
    grid = LocalGrid(
        data_dir=tmp_path / "grid",
        port=upstream,
        providers=1,
        engine="fake",
        model=MODEL,
        funding_credits=100,
        provider_args=["--skip-benchmark", "--no-startup-check"],
        provider_url=proxy.url,
        # The agent trusts the test CA only through this setting (idlegrid/tls.py).
        extra_env={
            "IDLEGRID_CA_BUNDLE": str(ca),
            "IDLEGRID_HEARTBEAT_INTERVAL_S": "0.5",
            "IDLEGRID_LOG_FORMAT": "json",
        },
    )
    try:
        grid.start_coordinator()
        wait_until(lambda: _answers(proxy.url, ca), timeout_s=30, interval_s=0.1)
        grid.start_provider(0)
        grid.wait_for_providers(1, timeout_s=120)
        wss = f"wss://127.0.0.1:{proxy.url.rsplit(':', 1)[1]}{CHANNEL}"
        wait_until(
            lambda: any(
                e["message"] == f"agent channel open: {wss}" for e in _log(grid, "provider-0")
            ),
            timeout_s=60,
            interval_s=0.1,
        )
        # Without the CA the proxy's certificate is refused: the setting above is what
        # let the agent in.
        with (
            httpx.Client(trust_env=False, timeout=10) as default_trust,
            pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            default_trust.get(f"{proxy.url}/readyz")
        # The operator's CLI makes the consumer's key through the proxy, trusting the CA
        # the same way (docs/deploy.md step 6).
        made = subprocess.run(
            [sys.executable, "-m", "idlegrid", "keys", "create", "remote-team", "--credits", "50"]
            + ["--coordinator", proxy.url, "--json", "--data-dir", str(tmp_path / "cli")],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "IDLEGRID_CA_BUNDLE": str(ca),
                "IDLEGRID_OPERATOR_KEY": grid.operator_key,
            },
        )
        assert made.returncode == 0, made.stderr
        api_key = json.loads(made.stdout)["api_key"]
        # The lease WebSockets (`idlegrid exec`) are upgraded through nginx too: the
        # coordinator's own refusal of a wrong key comes back, not a 404 for a plain GET.
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        with pytest.raises(InvalidStatus) as refused:
            connect(
                f"wss://127.0.0.1:{proxy.url.rsplit(':', 1)[1]}/api/v1/leases/lease_x/exec",
                additional_headers={"authorization": "Bearer wrong"},
                ssl=ssl.create_default_context(cafile=ca),
                open_timeout=10,
            ).close()
        assert refused.value.response.status_code == 401, refused.value.response.body
        assert json.loads(made.stdout)["balance"] == 50_000_000
        grid.fund_providers()  # the inference stake, posted by the agent through nginx

        trusted = ssl.create_default_context(cafile=ca)
        with httpx.Client(verify=trusted, timeout=60) as http:
            client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=api_key, http_client=http)
            done = client.completions.create(
                model=MODEL, prompt="Through the proxy", max_tokens=8, temperature=0
            )
            pieces: list[str] = []
            finish = None
            for chunk in client.completions.create(
                model=MODEL, prompt="Through the proxy", max_tokens=8, temperature=0, stream=True
            ):
                if chunk.choices:
                    pieces.append(chunk.choices[0].text)
                    finish = chunk.choices[0].finish_reason or finish
        assert done.choices[0].text and done.usage is not None
        assert done.usage.completion_tokens == 8 and done.choices[0].finish_reason == "length"
        # The same greedy answer, streamed (SSE) through nginx's unbuffered /v1/. How many
        # pieces it came in depends on timing (a fast engine's tokens arrive together).
        assert pieces and "".join(pieces) == done.choices[0].text
        assert finish == "length"
        # nginx stamped the request id (its $request_id: 32 hex), the coordinator kept it.
        rid = done._request_id
        assert rid is not None and re.fullmatch(r"[0-9a-f]{32}", rid), rid
        wait_until(lambda: rid in proxy.access_log.read_text(), timeout_s=10, interval_s=0.05)
        # ... and handed it to the provider, whose JSON line for the task carries it.
        served = [e for e in _log(grid, "provider-0") if e.get("request_id") == rid]
        assert served and "serving" in served[0]["message"], served

        def coordinator_logged() -> bool:
            return any(
                e["logger"] == "idlegrid.access" and e.get("request_id") == rid
                for e in _log(grid, "coordinator")
            )

        wait_until(coordinator_logged, timeout_s=10, interval_s=0.05)
    finally:
        grid.stop()
    # nginx writes a WebSocket's line when it closes: the provider's channel was upgraded
    # (101) through it.
    wait_until(
        lambda: f'"GET {CHANNEL} HTTP/1.1" 101' in proxy.access_log.read_text(),
        timeout_s=30,
        interval_s=0.1,
    )
    # Nothing the agent or the client sent failed in the proxy (a body nginx could not
    # spool, an upstream it could not reach) or in the coordinator.
    lines = proxy.access_log.read_text().splitlines()
    failed = [line for line in lines if re.search(r'" 5\d\d ', line)]
    assert not failed, failed
    assert any("/api/v1/hwproofs/" in line for line in lines)
