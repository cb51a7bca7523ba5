"""Leases API: a consumer's leases, ending one, exec (REST to the end, or a WebSocket that
streams), cp (tar streams over the same WebSocket) and logs.

Only the lease's own API key reaches it: another key gets 404, as for a lease that does
not exist. The WebSocket `/api/v1/leases/{id}/exec` speaks, after a first JSON frame
`{"argv": [...], "env", "cwd", "stdin": bool, "kill_on_disconnect": bool}`,
`{"cp": "in" | "out", "path": "/work/..."}`, `{"forward": PORT}` (one TCP connection
to 127.0.0.1:PORT inside the workspace, its bytes as stdin/stdout; coordinator/leases/forward.py)
or `{"shell": true, "rows", "cols"}` (bash on a PTY inside the sandbox; the client's
stdin is the keyboard, `{"type": "resize", "rows", "cols"}` resizes; leases/shell.py):
server → client: binary frames `0x01 + bytes` (stdout), `0x02 + bytes` (stderr); text
`{"type": "started", "exec"}`, `{"type": "exit", "code"}`, `{"type": "error", "status",
"message", "param", "fatal"}`;
client → server: binary `0x00 + bytes` (stdin), text `{"type": "eof"}`,
`{"type": "signal", "signal": N}`. A client frame the relay cannot take (not JSON, an
unknown type, a bad signal or size, stdin that is not open) is answered with a 400 error
frame naming the field, `"fatal": false`, and the command and the stream go on
(leases/control.py); a fatal error ends the stream.
A client that disconnects leaves the command running (its output goes to the lease's
logs) unless it asked `kill_on_disconnect`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from idlegrid.coordinator.deps import Services, parse, services
from idlegrid.coordinator.http_errors import status_for
from idlegrid.coordinator.leases import cp, forward, shell
from idlegrid.coordinator.leases import schemas as s
from idlegrid.coordinator.leases.control import Writer, read_consumer
from idlegrid.coordinator.leases.relay import ExecRelay
from idlegrid.coordinator.schemas import errors
from idlegrid.errors import IdlegridError, InvalidRequest

router = APIRouter(prefix="/api/v1", tags=["leases"])
OUTPUT_LIMIT = 1 << 20  # bytes per stream a REST exec returns


async def _key(request: Request | WebSocket) -> str:
    svc: Services = request.app.state.services
    return await svc.nodes.authenticate_key(request.headers.get("authorization"))


@router.get("/leases", response_model=s.LeaseList, responses=errors(401))
async def list_leases(request: Request) -> dict[str, Any]:
    """This key's leases, newest first."""
    key_id = await _key(request)
    svc = services(request)
    return {"leases": [v.to_dict() for v in await svc.db(svc.leases.of_key, key_id)]}


@router.get("/leases/{lease_id}", response_model=s.LeaseOut, responses=errors(401, 404))
async def get_lease(lease_id: str, request: Request) -> dict[str, Any]:
    """One lease: its state, moves with their causes, running and billed seconds."""
    key_id = await _key(request)
    svc = services(request)
    return (await svc.db(svc.leases.get, lease_id, key_id)).to_dict()


@router.post("/leases/{lease_id}/end", response_model=s.LeaseOut, responses=errors(401, 404, 409))
async def end_lease(lease_id: str, request: Request) -> dict[str, Any]:
    """End the lease: billed to now, the rest refunded; every process killed, /work wiped."""
    key_id = await _key(request)
    return (await services(request).leases.end_now(lease_id, key_id)).to_dict()


@router.post(
    "/leases/{lease_id}/extend",
    response_model=s.LeaseOut,
    responses=errors(400, 401, 402, 404, 409),
)
async def extend_lease(lease_id: str, request: Request) -> dict[str, Any]:
    """End the lease `hours` later: the extra worst case is escrowed first (402 if the
    balance cannot cover it, nothing changed); 409 once the lease is ending or over."""
    key_id = await _key(request)
    body = parse(s.ExtendIn, await request.body())
    svc = services(request)
    return (await svc.db(svc.leases.extend, lease_id, key_id, body.hours)).to_dict()


@router.get("/leases/{lease_id}/logs", response_model=s.LeaseLogs, responses=errors(401, 404))
async def lease_logs(lease_id: str, request: Request) -> dict[str, Any]:
    """The last 64 KiB its execs wrote (kept by the coordinator, lost on its restart)."""
    key_id = await _key(request)
    svc = services(request)
    await svc.db(svc.leases.get, lease_id, key_id)
    data = bytes(svc.leases.logs.get(lease_id, b""))
    return {"lease": lease_id, "logs": data.decode(errors="replace")}


@router.post(
    "/leases/{lease_id}/exec", response_model=s.ExecOut, responses=errors(400, 401, 404, 409)
)
async def exec_rest(lease_id: str, request: Request) -> dict[str, Any]:
    """Run a command to its end (killed after `timeout_s`); each stream cut at 1 MiB."""
    key_id = await _key(request)
    body = parse(s.ExecIn, await request.body())
    relay = await services(request).leases.open_exec(
        lease_id, key_id, body.argv, env=body.env, cwd=body.cwd, stdin=body.stdin is not None
    )
    if body.stdin is not None:
        await relay.write(body.stdin.encode())
        await relay.close_stdin()
    out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + body.timeout_s
    while True:
        try:
            kind, data = await asyncio.wait_for(relay.next(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            await relay.signal(9)
            deadline = loop.time() + 10  # the exit (137) follows the kill
            continue
        if kind in ("stdout", "stderr"):
            room = OUTPUT_LIMIT - len(out[kind])
            truncated |= len(data) > room
            out[kind].extend(data[: max(0, room)])
            await relay.credit(len(data))
            continue
        services(request).leases.relays.pop(relay.id, None)
        if kind == "error":
            raise IdlegridError(str(data))
        return {
            "exit_code": data,
            "stdout": out["stdout"].decode(errors="replace"),
            "stderr": out["stderr"].decode(errors="replace"),
            "truncated": truncated,
        }


@router.websocket("/leases/{lease_id}/exec")
async def exec_ws(ws: WebSocket, lease_id: str) -> None:
    """Stream a command's stdin, stdout and stderr (module docstring: the frames)."""
    svc: Services = ws.app.state.services
    try:
        key_id = await _key(ws)
        await svc.db(svc.leases.get, lease_id, key_id)
    except IdlegridError as exc:
        status, _ = status_for(exc)
        await ws.send_denial_response(
            JSONResponse({"error": {"message": exc.message, "code": exc.code}}, status)
        )
        return
    await ws.accept()
    try:
        first = json.loads(await ws.receive_text())
        relay, stdin, kill = await _start(svc, lease_id, key_id, first)
    except WebSocketDisconnect:
        return
    except (IdlegridError, ValueError, TypeError, KeyError) as exc:
        err = exc if isinstance(exc, IdlegridError) else InvalidRequest(f"first frame: {exc}")
        status, _ = status_for(err)
        await ws.send_text(
            json.dumps(
                {
                    "type": "error",
                    "status": status,
                    "message": err.message,
                    "param": err.data.get("param"),
                    "fatal": True,
                }
            )
        )
        await ws.close(code=4000 + status)
        return
    out = Writer(ws)
    await out.json({"type": "started", "exec": relay.id})
    reader = asyncio.create_task(read_consumer(ws, relay, stdin, out))
    left = False
    try:
        while not left:
            if relay.pending():
                kind, data = await relay.next_frame()  # output waiting: no task to race
            else:
                getter = asyncio.ensure_future(relay.next_frame())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()  # the consumer went away while the command was quiet
                    left = True
                    break
                kind, data = getter.result()
            if kind in ("stdout", "stderr"):
                left = reader.done()
                if not left:
                    # The agent's frame from its stream byte on: the consumer's frame as is.
                    await out.data(data)
                await relay.credit(len(data) - 1)  # taken, or in the logs: passed on either way
                continue
            msg = {"type": "exit", "code": data} if kind == "exit" else None
            msg = msg or {
                "type": "error",
                "status": 502,
                "message": data,
                "param": None,
                "fatal": True,
            }
            await out.json(msg)
            break
    except (WebSocketDisconnect, RuntimeError, OSError):
        left = True  # the consumer went away mid-stream
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
    if left and not relay.done:
        if kill:
            await relay.signal(9)
        relay.detach()  # the supervisor forgets it once it has exited
    else:
        svc.leases.relays.pop(relay.id, None)
    with contextlib.suppress(Exception):
        await ws.close()


async def _start(
    svc: Services, lease_id: str, key_id: str, first: dict[str, Any]
) -> tuple[ExecRelay, bool, bool]:
    if not isinstance(first, dict):
        raise InvalidRequest("first frame: a JSON object")
    direction = first.get("cp")
    argv: Any
    env: Any
    if first.get("shell"):
        argv = shell.argv_shell(first.get("rows", 24), first.get("cols", 80))
        stdin, env, cwd = True, {}, "/work"
    elif "forward" in first:
        argv, stdin, env, cwd = forward.argv_forward(first["forward"]), True, {}, "/work"
    elif direction is not None:
        path = str(first.get("path", ""))
        if direction not in ("in", "out"):
            raise InvalidRequest("cp: 'in' or 'out'", param="cp")
        argv = cp.argv_in(path) if direction == "in" else cp.argv_out(path)
        stdin, env, cwd = direction == "in", {}, "/work"
    else:
        argv = first.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidRequest("argv: a non-empty list of strings", param="argv")
        env = first.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise InvalidRequest("env: an object of strings", param="env")
        stdin, cwd = bool(first.get("stdin", False)), str(first.get("cwd") or "/work")
    # A forwarded connection's bytes are no log (and copying them there cost a copy each);
    # the agent connects to the port itself where it can, else runs `argv`.
    port = first.get("forward")  # checked by argv_forward above
    relay = await svc.leases.open_exec(
        lease_id, key_id, argv, env=env, cwd=cwd, stdin=stdin, log=port is None, forward=port
    )
    # A forwarded connection or a shell whose client left has nobody to talk to: it goes too.
    alone = "forward" in first or bool(first.get("shell"))
    relay.shell = bool(first.get("shell"))
    return relay, stdin, bool(first.get("kill_on_disconnect", alone))
