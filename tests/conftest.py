"""Shared fixtures: a database URL (SQLite, or PostgreSQL via IDLEGRID_TEST_DATABASE_URL)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PG_ENV = "IDLEGRID_TEST_DATABASE_URL"


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for one test: SQLite by default, PostgreSQL when configured.

    With IDLEGRID_TEST_DATABASE_URL set (a PostgreSQL server URL whose user may create
    databases), each test gets its own database, dropped afterwards.
    """
    base = os.environ.get(PG_ENV)
    if not base:
        yield f"sqlite:///{tmp_path / 'coordinator.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = "idlegrid_test_" + secrets.token_hex(6)
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        _drop(admin, name)
        admin.dispose()


def _drop(admin: Any, name: str) -> None:
    """Drop a test database, even while an autovacuum worker is in it.

    FORCE must be allowed to signal every backend in the database; an autovacuum worker
    belongs to no role, so without pg_signal_backend that fails. A plain DROP cancels
    autovacuum by itself and only fails while a real session is still connected.
    """
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    with admin.connect() as conn:
        try:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except DBAPIError as exc:
            if "pg_signal_backend" not in str(exc):
                raise
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


@pytest.fixture(autouse=True)
def _no_stake_rule(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit and integration grids predate the stake rule (issue 15): their providers serve
    paid requests without posting stake and without a verifier, so they run with no
    inference stake and no probation budget. Tests of those rules set them explicitly
    (settings arguments win over the environment); e2e runs the real defaults."""
    if "e2e" not in request.node.path.parts:
        monkeypatch.setenv("IDLEGRID_INFERENCE_STAKE", "0")
        monkeypatch.setenv("IDLEGRID_TRUST_PROBATION_BUDGET_UCR", "-1")
