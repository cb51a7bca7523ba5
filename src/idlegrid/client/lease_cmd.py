"""Lease commands: `idlegrid lease create|status|extend|end|logs`, `idlegrid exec`, `idlegrid cp`.

`exec` and `cp` speak the coordinator's WebSocket `/api/v1/leases/{id}/exec`
(coordinator/leases/routes.py): stdin, stdout and stderr streamed, the exit code kept;
`exec` passes the signals it gets (Ctrl-C, kill) on to the command, as a local one gets them;
`cp` sends or receives a tar stream (paths inside the lease are confined to /work).
An error frame with `"fatal": false` (a frame of ours the coordinator refused) is one line
on stderr, `idlegrid: <message> (<param>)`, and the command goes on; any other ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import secrets
import signal
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from rich.console import Console

from idlegrid.client.options import CoordinatorUrl, DataDir, JsonFlag

lease_app = typer.Typer(help="Leases: a sandboxed workspace on a provider, by the hour.")
err = Console(stderr=True)
CHUNK = 64 * 1024
FORWARD_CHUNK = 256 * 1024  # a forwarded socket read: larger frames, fewer of them
# What `exec` passes on to the command (Ctrl-C, Ctrl-\, kill, a closed terminal).
FORWARDED = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)


class LeaseError(Exception):
    """The coordinator refused or lost the command (status, message, param)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(f"{status}: {message}" + (f" (field: {param})" if param else ""))
        self.status, self.message, self.param = status, message, param


def warn(message: str) -> None:
    """One line on stderr for an error the command goes on after."""
    sys.stderr.write(f"idlegrid: {message}\n")
    sys.stderr.flush()


def exec_stream(
    url: str,
    api_key: str,
    lease_id: str,
    first: dict[str, Any],
    *,
    stdin: Iterator[bytes | dict[str, Any]] | Iterator[bytes] | None = None,
    on_output: Callable[[int, bytes], None] = lambda fd, data: None,
    forward_signals: bool = False,
    on_error: Callable[[str], None] = warn,
) -> int:
    """Run a command (or a cp, a forward, a shell) over the WebSocket; output goes to
    `on_output(1|2, bytes)` as it comes; `stdin` yields bytes (or a dict: a control frame,
    e.g. a shell's resize); returns the exit code, LeaseError if refused or lost.
    `forward_signals` (main thread only): FORWARDED signals go to the command, not to us.
    A frame the coordinator refused without ending the stream goes to `on_error` (by
    default one line on stderr) and the command goes on."""
    return asyncio.run(
        _exec(url, api_key, lease_id, first, stdin, on_output, forward_signals, on_error)
    )


async def _open(url: str, api_key: str, lease_id: str) -> Any:
    """The exec WebSocket of a lease (LeaseError with the status if refused).

    asyncio, not the sync client: that one holds one lock while a send blocks and while it
    takes frames in, so a stream busy both ways (an echo of megabytes) deadlocked it."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    ws_url = "ws" + url.rstrip("/")[4:] + f"/api/v1/leases/{lease_id}/exec"
    tls: dict[str, Any] = {}
    if ws_url.startswith("wss:"):
        from idlegrid.tls import client_ssl_context

        if (context := client_ssl_context()) is not None:  # IDLEGRID_CA_BUNDLE
            tls["ssl"] = context  # else the default store (ssl=None is refused for wss://)
    try:
        return await connect(
            ws_url,
            **tls,
            additional_headers={"authorization": f"Bearer {api_key}"},
            proxy=None,
            max_size=1 << 22,
            compression=None,
            open_timeout=10,
        )
    except InvalidStatus as exc:
        body = exc.response.body or b"{}"
        message = json.loads(body).get("error", {}).get("message", "refused")
        raise LeaseError(exc.response.status_code, message) from exc


async def _started(ws: Any, first: dict[str, Any]) -> None:
    await ws.send(json.dumps(first))
    started = json.loads(await ws.recv())
    if started.get("type") == "error":
        raise LeaseError(started["status"], started["message"], started.get("param"))


def _control(msg: str, on_error: Callable[[str], None] = warn) -> int | None:
    """The exit code a control frame reports (None: not the end); LeaseError for a fatal
    error, `on_error("<message> (<param>)")` for one the stream goes on after (a frame of
    ours the coordinator refused). An error without `fatal` (an older coordinator) ends."""
    ctl = json.loads(msg)
    if ctl.get("type") == "error":
        if ctl.get("fatal", True) is False:
            on_error(f"{ctl.get('message')} ({ctl.get('param')})")
            return None
        raise LeaseError(ctl.get("status", 502), ctl["message"], ctl.get("param"))
    return int(ctl["code"]) if ctl.get("type") == "exit" else None


async def _exec(
    url: str,
    api_key: str,
    lease_id: str,
    first: dict[str, Any],
    stdin: Iterator[bytes | dict[str, Any]] | Iterator[bytes] | None,
    on_output: Callable[[int, bytes], None],
    forward_signals: bool = False,
    on_error: Callable[[str], None] = warn,
) -> int:
    loop = asyncio.get_running_loop()
    async with await _open(url, api_key, lease_id) as ws:
        await _started(ws, {**first, "stdin": stdin is not None})
        sending = None
        sends: set[asyncio.Task[None]] = set()  # held, so a send is not collected midway

        def sent(task: asyncio.Task[None]) -> None:
            sends.discard(task)
            if not task.cancelled():
                task.exception()  # the socket closed: the command is over, nothing to pass on

        def forward(sig: int) -> None:
            task = loop.create_task(ws.send(json.dumps({"type": "signal", "signal": sig})))
            sends.add(task)
            task.add_done_callback(sent)

        if stdin is not None:
            # The source may block (a keyboard, a pipe): a thread reads it, a few parts ahead.
            parts: asyncio.Queue[bytes | dict[str, Any] | None] = asyncio.Queue(maxsize=4)
            source = stdin

            def feed() -> None:
                try:
                    for part in source:
                        asyncio.run_coroutine_threadsafe(parts.put(part), loop).result()
                    asyncio.run_coroutine_threadsafe(parts.put(None), loop).result()
                except Exception:  # the command ended first: it took what it wanted
                    return

            async def send() -> None:
                while (part := await parts.get()) is not None:
                    await ws.send(json.dumps(part) if isinstance(part, dict) else b"\x00" + part)
                await ws.send(json.dumps({"type": "eof"}))

            threading.Thread(target=feed, daemon=True).start()
            sending = asyncio.create_task(send())
        try:
            for sig in FORWARDED if forward_signals else ():
                loop.add_signal_handler(sig, forward, int(sig))
            async for msg in ws:
                if isinstance(msg, bytes):
                    on_output(msg[0], msg[1:])
                elif (code := _control(msg, on_error)) is not None:
                    return code
        finally:
            for sig in FORWARDED if forward_signals else ():
                loop.remove_signal_handler(sig)
            if sending is not None:
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sending
    raise LeaseError(502, "the connection closed before the command ended")


def tar_of(path: Path, name: str) -> bytes:
    """`path` (a file or folder) as a tar stream whose single top entry is `name`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=name)
    return buf.getvalue()


def chunks(data: bytes) -> Iterator[bytes]:
    """`data` in CHUNK-sized pieces."""
    for i in range(0, len(data), CHUNK):
        yield data[i : i + CHUNK]


def _grid(coordinator_url: str | None, data_dir: Path) -> tuple[str, str]:
    from idlegrid.client.localgrid import find_grid

    url, key = find_grid(coordinator_url, data_dir)
    if not key:
        err.print("[red]error[/]: no API key (set IDLEGRID_API_KEY or run `idlegrid up`)")
        raise typer.Exit(1)
    return url, key


def _call(coordinator_url: str | None, data_dir: Path, fn: Callable[[Any], Any]) -> Any:
    from idlegrid.client.sdk import GridAPIError, GridClient

    url, key = _grid(coordinator_url, data_dir)
    try:
        with GridClient(url, key) as c:
            return fn(c)
    except GridAPIError as exc:
        body = getattr(exc, "data", {}).get("body") or {}
        err.print(f"[red]error[/]: {body.get('message') or exc}")
        raise typer.Exit(1) from exc


@lease_app.command("create")
def create(
    data_dir: DataDir,
    hours: Annotated[float, typer.Option(help="Paid running hours.")] = 1.0,
    gpu: Annotated[str | None, typer.Option(help="Accelerator model, e.g. RTX-4090.")] = None,
    count: Annotated[int, typer.Option(help="Devices.")] = 1,
    max_price: Annotated[float, typer.Option(help="Credits per device-hour, at most.")] = 1.0,
    wait_s: Annotated[float, typer.Option(help="How long to wait for it to run.")] = 300.0,
    cpus: Annotated[float | None, typer.Option(help="CPU cores (default 1).")] = None,
    ram_gb: Annotated[float | None, typer.Option(help="Memory, GiB (default 2).")] = None,
    disk_gb: Annotated[float | None, typer.Option(help="Size of /work, GiB (default 4).")] = None,
    pip: Annotated[
        str | None, typer.Option(help="Requirements installed at start, comma-separated.")
    ] = None,
    egress: Annotated[
        bool,
        typer.Option(
            "--egress", help="Outbound internet (only providers that allow it; egress only)."
        ),
    ] = False,
    image: Annotated[
        str | None,
        typer.Option(help="An OCI image the provider has (runs on podman providers only)."),
    ] = None,
    restart_on_loss: Annotated[
        bool,
        typer.Option(
            "--restart-on-loss",
            help="If the provider is lost, order the unused hours again on another one "
            "(a new, empty workspace; the escrow carries over).",
        ),
    ] = False,
    coordinator_url: CoordinatorUrl = None,
) -> None:
    """Order a lease and wait until its workspace runs; prints the lease id."""
    resources: dict[str, Any] = {"max_price": max_price, "count": count}
    if gpu:
        resources["accelerators"] = [gpu]
    asked = {"cpus": cpus, "ram_gb": ram_gb, "disk_gb": disk_gb, "pip": pip, "image": image}
    resources.update({k: v for k, v in asked.items() if v is not None})
    if egress:
        resources["egress"] = True
    lease_id = "lease_" + secrets.token_hex(6)

    def run(c: Any) -> str:
        placed = c.create_lease(
            hours, resources, restart_on_loss=restart_on_loss, lease_id=lease_id
        )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                lease = c.current_lease(lease_id)  # a lost one's restart stands for it
                state = lease["state"]
            except Exception:  # not adopted yet: the coordinator's next tick makes it
                lease = {"id": lease_id}
                state = "pending" if placed["state"] == "active" else placed["state"]
            if state == "running":
                return str(lease["id"])
            if state in ("failed", "ended"):
                err.print(f"[red]lease {lease['id']} {state}[/]: {lease['message']}")
                raise typer.Exit(1)
            time.sleep(0.1)
        err.print(f"[red]lease {lease_id} is not running after {wait_s:g} s[/]")
        raise typer.Exit(1)

    typer.echo(_call(coordinator_url, data_dir, run))


@lease_app.command("status")
def status(
    lease_id: str,
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """A lease's state, its moves and what was billed."""
    data = _call(coordinator_url, data_dir, lambda c: c.lease(lease_id))
    if as_json:
        typer.echo(json.dumps(data))
        return
    typer.echo(f"{data['id']}  {data['state']}  on {data['node_id'][:12]}  "
               f"running {data['running_s']:.0f} s, billed {data['billed_s']} s")  # fmt: skip
    for t in data["transitions"]:
        typer.echo(f"  {t['at']:.3f}  {t['state']:<13} ({t['cause']})")
    if data.get("message"):
        typer.echo(f"  note: {data['message']}")
    if data.get("restarted_from"):
        typer.echo(f"  restarts {data['restarted_from']}, lost with its provider")
    if data.get("restarted_as"):
        typer.echo(f"  restarted as {data['restarted_as']}: idlegrid lease status "
                   f"{data['restarted_as']}")  # fmt: skip


@lease_app.command("end")
def end(lease_id: str, data_dir: DataDir, coordinator_url: CoordinatorUrl = None) -> None:
    """End a lease: its processes are killed and /work wiped; unused time is refunded."""
    data = _call(coordinator_url, data_dir, lambda c: c.end_lease(lease_id))
    typer.echo(f"{lease_id} {data['state']} (billed {data['billed_s']} s)")


@lease_app.command("extend")
def extend(
    lease_id: str,
    data_dir: DataDir,
    hours: Annotated[float, typer.Option(help="How many hours later it ends.")] = 1.0,
    coordinator_url: CoordinatorUrl = None,
) -> None:
    """Extend a live lease: its extra worst case is escrowed now (refused if short)."""
    data = _call(coordinator_url, data_dir, lambda c: c.extend_lease(lease_id, hours))
    typer.echo(f"{lease_id} {data['state']}, {data['hours']:g} h paid")


@lease_app.command("logs")
def logs(lease_id: str, data_dir: DataDir, coordinator_url: CoordinatorUrl = None) -> None:
    """The last output of the lease's commands."""
    typer.echo(_call(coordinator_url, data_dir, lambda c: c.lease_logs(lease_id)), nl=False)


def _print(fd: int, data: bytes) -> None:
    stream: BinaryIO = sys.stdout.buffer if fd == 1 else sys.stderr.buffer
    stream.write(data)
    stream.flush()


def exec_cmd(
    lease_id: str,
    argv: Annotated[list[str], typer.Argument(help="The command, after `--`.")],
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
    stdin: Annotated[bool, typer.Option("--stdin", "-i", help="Send this stdin.")] = False,
    kill_on_disconnect: Annotated[
        bool, typer.Option(help="Kill the command if this client goes away.")
    ] = False,
) -> None:
    """Run a command in a lease's workspace; its output streams here, its exit code is ours."""
    url, key = _grid(coordinator_url, data_dir)
    if argv and argv[0] == "--":
        argv = argv[1:]  # `idlegrid exec LEASE -- cmd`: the separator is not the command
    pipe: Any = sys.stdin.buffer
    source = iter(lambda: pipe.read1(CHUNK), b"") if stdin else None
    try:
        code = exec_stream(
            url, key, lease_id, {"argv": argv, "kill_on_disconnect": kill_on_disconnect},
            stdin=source, on_output=_print, forward_signals=True,
        )  # fmt: skip
    except LeaseError as exc:
        err.print(f"[red]error[/]: {exc}")
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


def shell_cmd(lease_id: str, data_dir: DataDir, coordinator_url: CoordinatorUrl = None) -> None:
    """An interactive shell in the lease's workspace (a PTY there: Ctrl-C, resize, job control)."""
    import os
    import queue
    import shutil

    url, key = _grid(coordinator_url, data_dir)
    keys: queue.Queue[bytes | dict[str, Any] | None] = queue.Queue()

    def typed() -> Iterator[bytes | dict[str, Any]]:
        while (item := keys.get()) is not None:
            yield item

    def read_keys() -> None:
        while data := os.read(0, 1024):
            keys.put(data)
        keys.put(None)

    def size() -> dict[str, Any]:
        s = shutil.get_terminal_size()
        return {"type": "resize", "rows": s.lines, "cols": s.columns}

    saved = None
    if sys.stdin.isatty():
        import termios
        import tty

        saved = termios.tcgetattr(0)
        tty.setraw(0)  # every key goes to the remote terminal, Ctrl-C included
        signal.signal(signal.SIGWINCH, lambda *_: keys.put(size()))
    threading.Thread(target=read_keys, daemon=True).start()
    first = size()
    try:
        code = exec_stream(
            url, key, lease_id, {"shell": True, "rows": first["rows"], "cols": first["cols"]},
            stdin=typed(), on_output=_print,
        )  # fmt: skip
    except LeaseError as exc:
        err.print(f"[red]error[/]: {exc}")
        raise typer.Exit(1) from exc
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, saved)
    raise typer.Exit(code)


def cp(
    src: Annotated[str, typer.Argument(help="LOCAL or LEASE:/work/path")],
    dst: Annotated[str, typer.Argument(help="LEASE:/work/path or LOCAL")],
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
) -> None:
    """Copy files into a lease (`cp ./data L:/work/data`) or out of it (`cp L:/work/out ./out`)."""
    url, key = _grid(coordinator_url, data_dir)
    errors = bytearray()
    try:
        if ":" in dst and ":" not in src:
            lease_id, path = dst.split(":", 1)
            local = Path(src)
            parent, name = (path.rsplit("/", 1) + [""])[:2] if "/" in path else ("/work", path)
            code = exec_stream(
                url, key, lease_id, {"cp": "in", "path": parent or "/work"},
                stdin=chunks(tar_of(local, name or local.name)),
                on_output=lambda fd, d: errors.extend(d),
            )  # fmt: skip
        elif ":" in src and ":" not in dst:
            lease_id, path = src.split(":", 1)
            buf = bytearray()

            def take(fd: int, data: bytes) -> None:
                (buf if fd == 1 else errors).extend(data)

            code = exec_stream(url, key, lease_id, {"cp": "out", "path": path}, on_output=take)
            if code == 0:
                extract(bytes(buf), Path(dst))
        else:
            err.print("[red]error[/]: exactly one side is LEASE:/path")
            raise typer.Exit(2)
    except LeaseError as exc:
        err.print(f"[red]error[/]: {exc}")
        raise typer.Exit(1) from exc
    if code != 0:
        err.print(f"[red]cp failed ({code})[/]: {errors.decode(errors='replace').strip()}")
        raise typer.Exit(1)


def forward_connection(url: str, api_key: str, lease_id: str, port: int, conn: Any) -> None:
    """Carry one accepted local TCP connection to `port` inside the lease, until either
    side closes."""
    try:
        asyncio.run(_forward(url, api_key, lease_id, port, conn))
    except (LeaseError, OSError) as exc:
        err.print(f"[red]forward to {port}[/]: {exc}")
    finally:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()


async def _forward(url: str, api_key: str, lease_id: str, port: int, conn: Any) -> None:
    loop = asyncio.get_running_loop()
    conn.setblocking(False)
    async with await _open(url, api_key, lease_id) as ws:
        await _started(ws, {"forward": port, "stdin": True})

        async def up() -> None:
            while data := await loop.sock_recv(conn, FORWARD_CHUNK):
                await ws.send(b"\x00" + data)
            await ws.send(json.dumps({"type": "eof"}))

        sending = asyncio.create_task(up())
        try:
            async for msg in ws:
                if isinstance(msg, bytes):
                    if msg[:1] == b"\x01":
                        # The local client's pace is the stream's.
                        await loop.sock_sendall(conn, memoryview(msg)[1:])
                    else:
                        err.print(msg[1:].decode(errors="replace"), end="")
                elif _control(msg) is not None:
                    return
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sending


def serve_forward(
    url: str, api_key: str, lease_id: str, local: int, remote: int, stop: threading.Event,
    ready: threading.Event | None = None,
) -> None:  # fmt: skip
    """Listen on 127.0.0.1:`local`; each connection is carried to `remote` in the lease."""

    with socket.create_server(("127.0.0.1", local)) as server:
        server.settimeout(0.2)
        if ready is not None:
            ready.set()
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            threading.Thread(
                target=forward_connection,
                args=(url, api_key, lease_id, remote, conn),
                daemon=True,
            ).start()


def port_forward(
    lease_id: str,
    ports: Annotated[str, typer.Argument(help="LOCAL:REMOTE, e.g. 8888:8888")],
    data_dir: DataDir,
    coordinator_url: CoordinatorUrl = None,
) -> None:
    """Forward a local TCP port to a port inside the lease's workspace (until Ctrl-C)."""
    local, _, remote = ports.partition(":")
    try:
        pair = int(local), int(remote or local)
    except ValueError:
        err.print("[red]error[/]: ports are LOCAL:REMOTE numbers")
        raise typer.Exit(2) from None
    url, key = _grid(coordinator_url, data_dir)
    err.print(f"forwarding 127.0.0.1:{pair[0]} → {lease_id}:{pair[1]} (Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):
        serve_forward(url, key, lease_id, pair[0], pair[1], threading.Event())


def extract(data: bytes, dst: Path) -> None:
    """Unpack a tar stream from a lease as `dst` (its single top entry renamed), with
    tarfile's data filter: nothing lands outside a scratch folder beside `dst`."""
    import shutil
    import tempfile

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as scratch:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(scratch, filter="data")
        (top,) = list(Path(scratch).iterdir())
        shutil.move(str(top), str(dst))
