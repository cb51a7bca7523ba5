"""The Files API against the real app on loopback, with the official `openai` client: the
local store and a real S3-compatible server (moto's, on loopback) behind the same tests;
SQLite, or PostgreSQL through IDLEGRID_TEST_DATABASE_URL."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from idlegrid.config import CoordinatorSettings
from idlegrid.coordinator.files.storage import FileStore, FsspecFileStore, LocalFileStore
from idlegrid.testbed.inprocess import CoordinatorThread, free_port

MAX_BYTES = 6_000_000  # past the 4 MiB bound on other bodies: uploads stream past it
MAX_LINES = 60_000
MAX_LINE = 200_000
BUCKET = "idlegrid-files"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible HTTP server on loopback, with one bucket."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=BUCKET)
    s3.close()
    yield url
    server.stop()


def _s3_options(endpoint: str) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }


@dataclass
class Env:
    coordinator: CoordinatorThread
    keys: list[str]
    content: FileStore
    clients: dict[str, openai.OpenAI] = field(default_factory=dict)

    def client(self, i: int = 0, key: str | None = None) -> openai.OpenAI:
        """The openai client of key `i` (or of `key`), closed when the test ends."""
        key = key or self.keys[i]
        if key not in self.clients:
            self.clients[key] = openai.OpenAI(
                base_url=f"{self.coordinator.url}/v1", api_key=key, max_retries=0
            )
        return self.clients[key]


@pytest.fixture(params=["local", "s3"])
def env(request: pytest.FixtureRequest, tmp_path: Path, database_url: str) -> Iterator[Env]:
    storage: dict[str, Any] = {}
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        prefix = f"{BUCKET}/{tmp_path.name}"
        storage = {"files_url": f"s3://{prefix}", "files_options": _s3_options(endpoint)}
    settings = CoordinatorSettings(
        data_dir=tmp_path,
        database_url=database_url,
        port=free_port(),
        files_max_bytes=MAX_BYTES,
        files_max_lines=MAX_LINES,
        files_max_line_bytes=MAX_LINE,
        **storage,
    )
    coordinator = CoordinatorThread(settings)
    coordinator.start()
    try:
        with coordinator.admin(timeout=30) as c:
            keys = [c.post("/api/v1/admin/keys", json={"name": n}).json()["api_key"] for n in "ab"]
        content: FileStore = (
            FsspecFileStore(storage["files_url"], storage["files_options"])
            if storage
            else LocalFileStore(tmp_path / "files")
        )
        env = Env(coordinator, keys, content)
        yield env
        for client in env.clients.values():
            client.close()
    finally:
        coordinator.stop()


def _jsonl(n: int, pad: int = 0) -> bytes:
    lines = [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "fake:1", "messages": [{"role": "user", "content": "x" * pad}]},
            }
        )
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


def _refusal(exc: pytest.ExceptionInfo[openai.BadRequestError]) -> dict[str, Any]:
    body = exc.value.body
    assert isinstance(body, dict)
    return body


def test_upload_list_retrieve_content_delete(env: Env, tmp_path: Path) -> None:
    data = _jsonl(3)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(data)
    client = env.client()
    with path.open("rb") as f:
        made = client.files.create(file=f, purpose="batch")
    assert made.id.startswith("file-") and made.object == "file"
    assert (made.bytes, made.filename, made.purpose, made.status) == (
        len(data),
        "requests.jsonl",
        "batch",
        "processed",
    )
    assert env.content.exists(made.id)
    assert [f.id for f in client.files.list()] == [made.id]
    assert [f.id for f in client.files.list(purpose="batch_output")] == []
    assert client.files.retrieve(made.id) == made
    assert client.files.content(made.id).content == data
    gone = client.files.delete(made.id)
    assert (gone.id, gone.deleted, gone.object) == (made.id, True, "file")
    assert not env.content.exists(made.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(made.id)
    assert list(client.files.list()) == []


def test_another_key_sees_no_such_file(env: Env) -> None:
    mine = env.client(0).files.create(file=("a.jsonl", _jsonl(1)), purpose="batch")
    other = env.client(1)
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError) as info:
            call(mine.id)
        assert info.value.status_code == 404 and mine.id in str(info.value)
    assert list(other.files.list()) == []
    assert env.client(0).files.content(mine.id).content == _jsonl(1)  # still there
    with pytest.raises(openai.AuthenticationError):  # the operator key is no API key
        env.client(key=env.coordinator.operator_key).files.list()


def test_pages_by_cursor(env: Env) -> None:
    client = env.client()
    ids = [
        client.files.create(file=(f"{i}.jsonl", _jsonl(1)), purpose="batch").id for i in range(5)
    ]
    first = client.files.list(limit=2, order="asc")
    assert [f.id for f in first.data] == ids[:2] and first.has_more
    assert [f.id for f in client.files.list(limit=2, order="asc")] == ids  # auto-paginates
    assert [f.id for f in client.files.list(limit=3)] == ids[::-1]
    with pytest.raises(openai.BadRequestError) as info:
        client.files.list(limit=0)
    assert _refusal(info)["param"] == "limit"
    with pytest.raises(openai.BadRequestError) as info:
        client.files.list(after="file-nope")
    assert _refusal(info)["param"] == "after"


def test_a_large_upload_streams_past_the_body_bound(env: Env) -> None:
    data = _jsonl(4000, pad=1200)  # ~5.2 MB: over the 4 MiB bound on JSON bodies
    assert 4 << 20 < len(data) < MAX_BYTES
    made = env.client().files.create(file=("big.jsonl", data), purpose="batch")
    assert made.bytes == len(data)
    assert env.client().files.content(made.id).content == data


@pytest.mark.parametrize(
    ("upload", "param", "limit", "words"),
    [
        (b"{}\n" * (MAX_BYTES // 3 + 1), "file", "files_max_bytes", f"{MAX_BYTES} bytes"),
        (b"{}\n" * (MAX_LINES + 1), "file", "files_max_lines", f"{MAX_LINES} lines"),
        (b'{"a": "' + b"x" * MAX_LINE + b'"}\n', "file", "files_max_line_bytes", "line 1"),
        (b'{"a": 1}\n{"a": 2}\nnot json\n', "file", None, "line 3 is not valid JSON"),
        (b'{"a": 1}\n[1, 2]\n', "file", None, "line 2 is not a JSON object"),
        (b"\n\n", "file", None, "no JSON lines"),
    ],
)
def test_limits_and_bad_files_are_refused_naming_them(
    env: Env, upload: bytes, param: str, limit: str | None, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        env.client().files.create(file=("bad.jsonl", upload), purpose="batch")
    body = _refusal(info)
    assert body["param"] == param and words in body["message"], body
    assert body["data"].get("limit") == limit
    assert list(env.client().files.list()) == []


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"purpose": "fine-tune"}, "purpose"),
        ({"purpose": "batch_output"}, "purpose"),
        (
            {"purpose": "batch", "expires_after": {"anchor": "created_at", "seconds": 3600}},
            "expires_after",
        ),
    ],
)
def test_purposes_and_fields_not_honoured_are_refused(
    env: Env, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        env.client().files.create(file=("x.jsonl", _jsonl(1)), **kwargs)
    assert _refusal(info)["param"] == param
    assert list(env.client().files.list()) == []


def test_the_grid_writes_batch_output_files_the_owner_reads(env: Env) -> None:
    svc = env.coordinator.app.state.services
    key_id = svc.store.key_for_secret(env.keys[0])
    out = b'{"id": "batch_req_1", "custom_id": "r0"}\n'
    made = svc.files.save(
        key_id, "batch_1_output.jsonl", "batch_output", io.BytesIO(out), system=True
    )
    client = env.client()
    assert [f.id for f in client.files.list(purpose="batch_output")] == [made["id"]]
    assert client.files.content(made["id"]).content == out
    with pytest.raises(openai.NotFoundError):
        env.client(1).files.content(made["id"])


class _Breaks(io.BytesIO):
    """A source that fails part-way through the store's copy (after the scan seeks back)."""

    passes = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.passes += 1
        return super().seek(pos, whence)

    def read(self, n: int | None = -1) -> bytes:
        if self.passes >= 1 and self.tell() > 0:
            raise OSError("the disk went away")
        return super().read(1 if self.passes >= 1 else n)


def test_a_write_that_fails_leaves_no_listed_file_and_no_content(
    tmp_path: Path, database_url: str
) -> None:
    from sqlalchemy import text

    from idlegrid.coordinator.context import Context
    from idlegrid.coordinator.db.store import Store, migrate
    from idlegrid.coordinator.files.service import Files

    migrate(database_url)
    store = Store(database_url, lambda: 1000.0)
    try:
        ctx = Context(
            CoordinatorSettings(data_dir=tmp_path, database_url=database_url), store, lambda: 1000.0
        )
        content = LocalFileStore(tmp_path / "files")
        files = Files(ctx, content)
        # The content fails half-written: nothing is left in the store, no row is written.
        with pytest.raises(OSError):
            files.save("key_a", "a.jsonl", "batch", _Breaks(_jsonl(2)))
        assert list((tmp_path / "files").iterdir()) == []
        assert files.page("key_a")["data"] == []
        # The row cannot be written: the stored content is removed again.
        with store.tx() as s:
            s.execute(text("DROP TABLE files"))
        with pytest.raises(Exception, match="files"):
            files.save("key_a", "a.jsonl", "batch", io.BytesIO(_jsonl(2)))
        assert list((tmp_path / "files").iterdir()) == []
    finally:
        store.close()
