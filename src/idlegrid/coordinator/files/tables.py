"""The table of stored files (migration 0014_files): metadata only, the content is in the
file store under the file's id."""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from idlegrid.coordinator.db.tables import Base


class StoredFile(Base):
    """One file: who owns it, what it is for, how big; a row exists only once its content
    is stored (service.py orders the writes)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_key_created", "key_id", "created_at", "id"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64))  # the API key that uploaded it
    purpose: Mapped[str] = mapped_column(String(32))  # batch | batch_output
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer)  # non-blank JSON lines
    status: Mapped[str] = mapped_column(String(16))  # processed (OpenAI's deprecated field)
    created_at: Mapped[float] = mapped_column(Float)
