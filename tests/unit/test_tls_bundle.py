"""IDLEGRID_CA_BUNDLE (idlegrid/tls.py): which certificates the agent and the CLI trust."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from idlegrid.tls import CABundleError, client_ssl_context, httpx_verify


def test_no_bundle_named_keeps_the_default_trust_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDLEGRID_CA_BUNDLE", raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    assert client_ssl_context() is None
    assert httpx_verify() is True


def test_an_unreadable_bundle_is_a_typed_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    monkeypatch.setenv("IDLEGRID_CA_BUNDLE", str(bad))
    with pytest.raises(CABundleError, match=str(bad)):
        client_ssl_context()
    monkeypatch.setenv("IDLEGRID_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(CABundleError, match="missing.pem"):
        httpx_verify()


def test_ssl_cert_file_is_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDLEGRID_CA_BUNDLE", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "absent.pem"))
    with pytest.raises(CABundleError, match="absent.pem"):
        client_ssl_context()
    # A real bundle loads, and is the only one trusted.
    import certifi

    monkeypatch.setenv("SSL_CERT_FILE", certifi.where())
    ctx = client_ssl_context()
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] == certifi.contents().count("BEGIN CERTIFICATE")
