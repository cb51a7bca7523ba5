"""Settings, read from IDLEGRID_* environment variables (pydantic-settings) and CLI flags."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 8700
OPERATOR_KEY_FILE = "operator-key"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def default_data_dir() -> Path:
    """$IDLEGRID_DATA_DIR, else the XDG data directory ($XDG_DATA_HOME/idlegrid)."""
    if os.environ.get("IDLEGRID_DATA_DIR"):
        return Path(os.environ["IDLEGRID_DATA_DIR"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "idlegrid"


class CoordinatorSettings(BaseSettings):
    """Everything the coordinator can be told; every field has an IDLEGRID_ env twin."""

    model_config = SettingsConfigDict(env_prefix="IDLEGRID_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    # Any SQLAlchemy URL; empty means SQLite in data_dir. Tests select PostgreSQL here.
    database_url: str = ""
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    fee_bps: int = Field(200, ge=0, le=10_000, description="protocol fee, basis points")
    # Disputes (both kinds) are settled by a panel of this many verifiers, majority rules;
    # with too few eligible verifiers a dispute waits this long, then expires (nobody slashed).
    dispute_panel_k: int = Field(3, ge=3)
    dispute_panel_wait_s: float = Field(3600.0, gt=0)
    heartbeat_interval_s: float = Field(2.0, gt=0)
    # A node that misses heartbeats this long is dead; its tasks go to someone else.
    node_timeout_s: float = Field(6.0, gt=0)
    # A running attempt with no output for this long is handed to another provider.
    stall_timeout_s: float = Field(20.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    long_poll_s: float = Field(15.0, gt=0)
    signature_skew_s: float = Field(30.0, gt=0)
    # How long a queued request waits for any provider before it fails (503).
    queue_timeout_s: float = Field(120.0, gt=0)
    max_tokens_limit: int = Field(8192, gt=0)
    default_chat_max_tokens: int = Field(512, gt=0)
    # Market: stake each device must have posted before its offer takes orders (µcr).
    stake_per_device: int = Field(5_000_000, ge=0)
    # Serving paid inference needs this much posted in the node's stake accounts
    # (`stake:<node>:<device class>`, what the agent's --stake posts per device; µcr).
    inference_stake: int = Field(5_000_000, ge=0)
    # A reserved provider serves only its owner this long after the owner's last covered
    # request (docs/market.md, "Reservations"); after that it is spare capacity.
    reservation_grace_s: float = Field(2.0, ge=0)
    # Accrue running orders this often; SLO misses are refunded per window of this width.
    accrual_interval_s: float = Field(10.0, gt=0)
    # Unmatched orders wait this long for capacity, then expire with a full refund.
    order_ttl_s: float = Field(600.0, gt=0)
    # Pay accruals out in batches, only once they are older than the audit window.
    payout_interval_s: float = Field(600.0, gt=0)
    payout_delay_s: float = Field(300.0, ge=0)
    # Challenge claimed hardware (matmul and memory proofs; knobs in IDLEGRID_HW_*).
    hw_proofs: bool = True
    # Comma-separated module prefixes whose pricing plug-ins may run in the coordinator.
    pricing_plugins: str = ""
    # Heartbeats carry the node's energy counter; one sample per node per interval is kept.
    power_sample_interval_s: float = Field(10.0, gt=0)
    # Dashboard pages need no login from this machine even with an operator key (set by
    # `idlegrid up`: a local grid). Admin routes still need the key.
    dashboard_open_on_loopback: bool = False
    # Request bodies past this are refused with 413 before they are read to the end; the
    # signed training routes carry checkpoints (protocol/training.py bounds them at 96 MB
    # of base64) and get the larger bound.
    max_body_bytes: int = Field(4 << 20, gt=0)
    # A connection must send its request headers within this (slow or idle clients are cut).
    header_timeout_s: float = Field(10.0, gt=0)
    # A request without `max_price` goes to providers at most this dear (credits per 1M
    # tokens), 100x the agent's default prices: a node offering absurd prices serves nobody
    # who did not ask for it, and never sizes anyone's escrow.
    default_max_prompt_price: float = Field(1_000.0, ge=0, le=100_000)
    default_max_output_price: float = Field(4_000.0, ge=0, le=100_000)
    max_checkpoint_body_bytes: int = Field(100 << 20, gt=0)
    # Operator key for admin routes (minting credits, creating keys). Empty: the key in
    # data_dir/operator-key, created (mode 0600) on first start. Never the peer address
    # alone: a same-host forwarder or proxy makes every caller look local.
    operator_key: str = ""
    # Host header names this coordinator answers to, comma-separated, besides loopback
    # names and --host; "*" any (refuses DNS rebinding from a browser on this machine).
    allowed_hosts: str = ""
    # Files API (docs/files.md): where uploaded content lives. Empty: data_dir/files; else
    # any fsspec URL (`s3://bucket/prefix`), its options (endpoint_url, key, secret, ...) in
    # files_options as JSON, or the backend's standard environment (AWS_* for S3).
    # Where per-key rate-limit counters live (a `limits` storage URL): memory:// counts per
    # coordinator process; several replicas share one redis:// or memcached:// instead.
    rate_limit_storage: str = "memory://"
    files_url: str = ""
    files_options: dict[str, Any] = Field(default_factory=dict)
    # Limits of one upload, OpenAI's for batch input: 200 MB, 50,000 lines; a line is one
    # request, so it may be no longer than a request body.
    files_max_bytes: int = Field(200_000_000, gt=0)
    files_max_lines: int = Field(50_000, gt=0)
    files_max_line_bytes: int = Field(4 << 20, gt=0)
    # Batches (docs/batch.md): a batch token's price as a share of the interactive one, in
    # basis points, and how many lines of all batches run at once (each an ordinary task,
    # claimed only after interactive work).
    batch_price_bps: int = Field(5_000, ge=0, le=10_000)
    batch_in_flight: int = Field(8, ge=1, le=10_000)
    # The completion windows a batch may ask for (OpenAI offers only 24h), in seconds.
    batch_windows: dict[str, float] = Field(default_factory=lambda: {"24h": 86_400.0})

    def ensure_operator_key(self) -> str:
        """The operator key: configured, else read from (or created in) the data dir."""
        if self.operator_key:
            return self.operator_key
        path = self.data_dir / OPERATOR_KEY_FILE
        if path.exists():
            self.operator_key = path.read_text().strip()
        if not self.operator_key:
            self.operator_key = secrets.token_urlsafe(24)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.operator_key + "\n")
        return self.operator_key

    def host_names(self) -> list[str]:
        """Host header values accepted (TrustedHostMiddleware patterns)."""
        extra = [h.strip() for h in self.allowed_hosts.split(",") if h.strip()]
        if "*" in extra:
            return ["*"]
        if self.host in ("0.0.0.0", "::", ""):  # a wildcard bind names no host of its own
            return [*LOOPBACK_NAMES, *extra] if extra else ["*"]
        return [*LOOPBACK_NAMES, self.host, *extra]

    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL in use."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'coordinator.db'}"
