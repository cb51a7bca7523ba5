"""`ctx.ejected` follows the store: re-read once the transaction that ejects commits, never
before (a ruling ejects inside a savepoint, whose release SQLAlchemy also reports as a
commit), and never for a transaction that rolls back."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from idlegrid.coordinator.context import Ejected


@pytest.fixture
def cache(tmp_path: Path) -> tuple[Ejected, list[list[str]], object]:
    engine = create_engine(f"sqlite:///{tmp_path / 't.db'}")
    with engine.begin() as c:
        c.execute(text("create table ejected (id text)"))
    reads: list[list[str]] = []

    def loader() -> list[str]:
        with engine.connect() as c:  # a fresh read: only what is committed
            ids = [str(r[0]) for r in c.execute(text("select id from ejected"))]
        reads.append(ids)
        return ids

    ej = Ejected()
    ej.loader = loader
    return ej, reads, engine


def test_an_ejection_in_a_savepoint_is_read_after_the_outer_commit(cache) -> None:
    ej, reads, engine = cache
    with Session(engine) as s, s.begin():
        with s.begin_nested():
            s.execute(text("insert into ejected values ('n1')"))
            ej.refresh_after(s)
        assert reads == [] and "n1" not in ej  # released, not committed: not read yet
        s.execute(text("select 1"))
    assert reads == [["n1"]] and "n1" in ej and len(ej) == 1


def test_a_rolled_back_ejection_is_never_read(cache) -> None:
    ej, reads, engine = cache
    with pytest.raises(RuntimeError), Session(engine) as s, s.begin():
        with s.begin_nested():
            s.execute(text("insert into ejected values ('n1')"))
            ej.refresh_after(s)
        raise RuntimeError("the ruling's transaction fails")
    assert reads == [] and "n1" not in ej


def test_an_older_read_never_overwrites_a_newer_one() -> None:
    """A supervisor pass's read that began before an ejection committed, and ends after the
    post-commit read did, must not put the stale set back."""
    ej = Ejected()

    def stale() -> list[str]:
        ej.loader = lambda: ["n1"]
        ej.refresh()  # a newer read begins and ends while this one is in flight
        return []  # what this older read saw, before the ejection committed

    ej.loader = stale
    ej.refresh()
    assert set(ej) == {"n1"}
