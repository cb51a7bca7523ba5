"""Alembic environment: runs migrations against the URL the coordinator was given."""

from alembic import context
from sqlalchemy import create_engine, pool

from idlegrid.coordinator.batches import tables as batches_tables  # noqa: F401  (registers them)
from idlegrid.coordinator.db.tables import Base
from idlegrid.coordinator.files import tables as files_tables  # noqa: F401  (registers them)
from idlegrid.coordinator.leases import tables as leases_tables  # noqa: F401  (registers them)
from idlegrid.coordinator.training import tables as training_tables  # noqa: F401  (registers them)
from idlegrid.coordinator.trust import tables as trust_tables  # noqa: F401  (registers them)

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)
    with engine.connect() as connection:
        # render_as_batch: SQLite cannot ALTER most things in place.
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
