"""Shared fixtures: a database URL (SQLite, or PostgreSQL via IDLEGRID_TEST_DATABASE_URL)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

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
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
