"""Which certificates the agent and the client trust when they dial a coordinator over TLS.

Their HTTP clients ignore the environment (`trust_env=False`: a LAN coordinator must not
go through `HTTPS_PROXY`), so httpx would trust only certifi's bundle, and a grid behind
a private or self-signed CA would be unreachable. `IDLEGRID_CA_BUNDLE` (else the usual
`SSL_CERT_FILE`) names a PEM bundle that replaces the default trust store for both HTTPS
and the agent channel's `wss://`, as `REQUESTS_CA_BUNDLE` does for requests.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from idlegrid.errors import IdlegridError

CA_BUNDLE_ENV = "IDLEGRID_CA_BUNDLE"


class CABundleError(IdlegridError):
    """The named CA bundle cannot be read as PEM certificates."""

    code = "ca_bundle_unreadable"


def ca_bundle() -> Path | None:
    """The CA bundle named by the environment, or None for the default trust store."""
    named = os.environ.get(CA_BUNDLE_ENV) or os.environ.get("SSL_CERT_FILE")
    return Path(named) if named else None


def client_ssl_context() -> ssl.SSLContext | None:
    """An SSL context that trusts the named CA bundle, or None for the library default."""
    bundle = ca_bundle()
    if bundle is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(bundle))
    except (OSError, ssl.SSLError) as exc:
        raise CABundleError(
            f"cannot read the CA bundle {bundle} ({CA_BUNDLE_ENV}): {exc}", path=str(bundle)
        ) from exc


def httpx_verify() -> ssl.SSLContext | bool:
    """The `verify=` argument for an httpx client that dials the coordinator."""
    return client_ssl_context() or True
