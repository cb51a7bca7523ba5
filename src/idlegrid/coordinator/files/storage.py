"""Where file content lives: one `FileStore` interface, the data directory by default, any
fsspec URL (`s3://bucket/prefix`, `gs://...`, `file:///...`) by setting.

Content is written whole or not at all: the local store writes a temporary file and
renames it into place; the fsspec store aborts a half-written object (a multipart upload
on S3) and removes whatever is left. The service writes the content before the file's
row and removes the row before the content (service.py), so a crash between the two leaves
at worst content that nothing lists, never a listed file without content.

fsspec (and s3fs for S3) is imported only when a URL is set: `pip install idlegrid[s3]`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

CHUNK = 1 << 20  # bytes read or written at a time: bounded memory for any file size
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _checked(name: str) -> str:
    # Names are ids the service made; refusing anything else keeps paths inside the root.
    if not _NAME.match(name):
        raise ValueError(f"not a file store name: {name!r}")
    return name


class FileStore(Protocol):
    """Content by name: put whole, read in chunks, delete."""

    url: str

    def put(self, name: str, src: BinaryIO) -> None:
        """Store everything `src` holds (from where it stands) under `name`."""
        ...

    def chunks(self, name: str) -> Iterator[bytes]:
        """The content stored under `name`, chunk by chunk (FileNotFoundError if none)."""
        ...

    def delete(self, name: str) -> None:
        """Remove the content under `name`; nothing there is not an error."""
        ...

    def exists(self, name: str) -> bool:
        """Whether content is stored under `name`."""
        ...


class LocalFileStore:
    """Files in a directory of this machine (the coordinator's data dir by default)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.root / _checked(name)

    def put(self, name: str, src: BinaryIO) -> None:
        """Write to a temporary name, flush to disk, then rename into place (atomic)."""
        final = self._path(name)
        part = final.with_name(f".{name}.part")
        try:
            with part.open("wb") as f:
                shutil.copyfileobj(src, f, CHUNK)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, final)
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def chunks(self, name: str) -> Iterator[bytes]:
        """Read the file chunk by chunk."""
        with self._path(name).open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def delete(self, name: str) -> None:
        """Remove the file if it is there."""
        self._path(name).unlink(missing_ok=True)

    def exists(self, name: str) -> bool:
        """Whether the file is there."""
        return self._path(name).is_file()


class FsspecFileStore:
    """Files under any fsspec URL; `options` go to the filesystem (for S3: endpoint_url,
    key, secret, client_kwargs; without them s3fs reads the standard AWS_* environment)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        try:
            import fsspec
        except ImportError as exc:  # the s3 extra is not installed
            raise RuntimeError(
                f"IDLEGRID_FILES_URL={url} needs fsspec: pip install 'idlegrid[s3]'"
            ) from exc
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **(options or {}))
        self.root = root.rstrip("/")
        # Nothing is listed through a cache: another coordinator may have written since.
        self.fs.invalidate_cache()

    def _path(self, name: str) -> str:
        return f"{self.root}/{_checked(name)}"

    def put(self, name: str, src: BinaryIO) -> None:
        """Stream `src` into the object; on any failure abort it (closing would commit
        what was written so far) and remove what is left."""
        path = self._path(name)
        f = self.fs.open(path, "wb")
        try:
            shutil.copyfileobj(src, f, CHUNK)
        except BaseException:
            with contextlib.suppress(Exception):
                discard = getattr(f, "discard", None)
                if discard is not None:
                    discard()
                else:
                    f.close()
            with contextlib.suppress(Exception):
                self.fs.rm(path)
            raise
        f.close()

    def chunks(self, name: str) -> Iterator[bytes]:
        """Read the object chunk by chunk."""
        with self.fs.open(self._path(name), "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def delete(self, name: str) -> None:
        """Remove the object if it is there."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(name))

    def exists(self, name: str) -> bool:
        """Whether the object is there (asked of the backend, not a cache)."""
        self.fs.invalidate_cache(self.root)
        return bool(self.fs.exists(self._path(name)))


def open_store(url: str, options: dict[str, Any], data_dir: Path) -> FileStore:
    """The store a coordinator's settings name: `url` if set, else `data_dir/files`."""
    if url:
        return FsspecFileStore(url, options)
    return LocalFileStore(data_dir / "files")
