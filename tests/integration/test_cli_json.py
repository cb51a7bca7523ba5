"""The CLI against a real coordinator on loopback (a FakeEngine provider in-process): the
`train` sub-app and its old flat names act alike, and every command that prints a table
prints JSON alone on stdout with `--json`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_grid import MODEL, Grid, start_grid, stop_grid
from typer.testing import CliRunner

from idlegrid.client.cli import app
from idlegrid.client.localgrid import KEY_FILE
from idlegrid.engines.fake import FakeEngine

runner = CliRunner()
# The smallest job `train` submits; no training provider runs, so it stays queued.
TINY = ["--steps", "8", "--interval", "8", "--layers", "1", "--dim", "32", "--heads", "2"]
TINY += ["--seq", "16", "--batch", "4", "--windows", "64", "--timeout", "0"]


class Cli:
    def __init__(self, grid: Grid, data_dir: Path) -> None:
        self.grid, self.data_dir = grid, data_dir

    def __call__(self, *args: str, code: int = 0) -> Any:
        """Run the CLI as the grid's consumer (and operator: both keys are in the data dir)."""
        res = runner.invoke(
            app,
            [*args, "--coordinator", self.grid.url, "--data-dir", str(self.data_dir)],
            env={"COLUMNS": "80"},
        )
        assert res.exit_code == code, (args, res.output)
        return res

    def json(self, *args: str, code: int = 0) -> Any:
        """`args --json`: stdout must be one JSON document and nothing else."""
        return json.loads(self(*args, "--json", code=code).stdout)


@pytest.fixture
def cli(tmp_path: Path, database_url: str) -> Iterator[Cli]:
    grid = start_grid(tmp_path, database_url, [FakeEngine(MODEL)])
    (tmp_path / KEY_FILE).write_text(grid.api_key)  # the operator key is there already
    yield Cli(grid, tmp_path)
    grid.verify()
    stop_grid(grid)


def test_train_subcommands_and_their_old_names_act_alike(cli: Cli) -> None:
    pytest.importorskip("torch")  # `train` hashes the corpus with the training package
    # Both submit forms submit; --timeout 0 stops following at once: exit 2, the job as JSON.
    old = cli.json("train", *TINY, code=2)
    new = cli.json("train", "run", *TINY, code=2)
    for job in (old, new):
        assert job["state"] == "queued" and job["steps"] == 8 and job["verified_step"] == 0
    assert old["id"] != new["id"]

    listed = cli.json("train", "jobs")
    assert sorted(j["id"] for j in listed["jobs"]) == sorted([old["id"], new["id"]])
    assert cli.json("jobs") == listed
    table = cli("train", "jobs").stdout
    assert old["id"] in table and new["id"] in table and "…" not in table

    shown, aliased = cli.json("train", "show", old["id"]), cli.json("job", old["id"])
    assert shown["id"] == aliased["id"] == old["id"]
    assert shown["spec"] == aliased["spec"] and shown["state"] == aliased["state"] == "queued"
    assert old["id"] in cli("train", "show", old["id"]).stdout

    # The job's market order answers in JSON too.
    order_id = shown["market"]["order_id"]
    assert cli.json("market", "order", order_id)["id"] == order_id
    assert cli.json("market", "explain", order_id)["order"] == order_id

    assert cli.json("train", "cancel", old["id"])["state"] == "canceled"
    canceled = cli.json("cancel-job", new["id"])
    assert canceled["state"] == "canceled" and canceled["bill"]["charged"] == 0
    assert {j["state"] for j in cli.json("train", "jobs")["jobs"]} == {"canceled"}
    # A job that is not there: one line, exit 1, whichever name asked.
    for args in (("train", "show", "job-nope"), ("job", "job-nope")):
        assert cli(*args, code=1).stdout == ""


def _lines(n: int) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return "".join(
        json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": body}) + "\n"
        for i in range(n)
    )  # fmt: skip


def test_every_table_command_prints_json_alone(cli: Cli, tmp_path: Path) -> None:
    status = cli.json("status")
    assert [n["name"] for n in status["nodes"]] == ["p0"] and "me" in status
    assert cli.json("balance")["balance"] > 0
    assert [p["name"] for p in cli.json("earnings")["providers"]] == ["p0"]
    est = cli.json("estimate", "--model", MODEL, "--decode-tps", "50", "--watts", "100")
    assert est["model"] == MODEL and est["decode_tps"] == 50
    assert cli.json("market", "offers")["total"] >= 0
    assert set(cli.json("market", "orders")) == {"orders", "batches"}
    assert cli.json("ledger", "verify") == {"ok": True, "problems": []}

    src = tmp_path / "in.jsonl"
    src.write_text(_lines(3))
    batch = cli.json("batch", "submit", str(src), "--wait")
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3
    assert cli.json("batch", "status", batch["id"])["id"] == batch["id"]
    assert [b["id"] for b in cli.json("batch", "list")["data"]] == [batch["id"]]
    assert batch["id"] in cli("batch", "list").stdout  # the table, never cut
    out = tmp_path / "out.jsonl"
    wrote = cli.json("batch", "results", batch["id"], "-o", str(out))
    assert wrote == {"path": str(out), "bytes": out.stat().st_size}
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == [
        "l0",
        "l1",
        "l2",
    ]
    # An ended batch cannot be cancelled: one line on stderr, nothing on stdout, exit 1.
    refused = cli("batch", "cancel", batch["id"], "--json", code=1)
    assert refused.stdout == "" and len(refused.output.strip().splitlines()) == 1

    made = cli.json("keys", "create", "team-b")
    funded = cli.json("keys", "fund", made["key_id"], "1.5", "--reference", "pay-9")
    assert funded["key_id"] == made["key_id"] and funded["balance"] == 1_500_000
    assert funded["created"] is True
    assert (
        cli.json("keys", "fund", made["key_id"], "1.5", "--reference", "pay-9")["created"] is False
    )
    assert made["key_id"] in {k["key_id"] for k in cli.json("keys", "list")["keys"]}
    revoked = cli.json("keys", "revoke", made["key_id"])
    assert revoked["key_id"] == made["key_id"] and revoked["changed"] is True
    assert cli.json("keys", "revoke", made["key_id"])["changed"] is False
