"""An interactive shell in a workspace: a PTY made inside the sandbox (bwrap's own /dev
has a devpts), so its line discipline turns the consumer's Ctrl-C (byte 0x03) into SIGINT
for the foreground job there, and `bash` sees a terminal. The helper's stdin is framed by
the coordinator (`data` and `resize` records), so a resize travels in band with the keys
that follow it; its stdout is the terminal's output, raw."""

from __future__ import annotations

import struct

from idlegrid.errors import InvalidRequest

HELPER = r"""
import fcntl, os, pty, select, signal, struct, sys, termios
rows, cols = int(sys.argv[1]), int(sys.argv[2])
pid, fd = pty.fork()
if pid == 0:
    os.environ["TERM"] = os.environ.get("TERM") or "xterm-256color"
    os.execvp("bash", ["bash", "-i"])
def size(r, c):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", r, c, 0, 0))
size(rows, cols)
buf = b""
stdin_open = True
while True:
    fds = [fd] + ([0] if stdin_open else [])
    ready, _, _ = select.select(fds, [], [])
    if fd in ready:
        try:
            out = os.read(fd, 65536)
        except OSError:
            out = b""
        if not out:
            break
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
    if 0 in ready:
        more = os.read(0, 65536)
        if not more:
            stdin_open = False
            os.kill(pid, signal.SIGHUP)
            continue
        buf += more
        while len(buf) >= 5:
            kind, n = buf[:1], struct.unpack(">I", buf[1:5])[0]
            if len(buf) < 5 + n:
                break
            body, buf = buf[5 : 5 + n], buf[5 + n :]
            if kind == b"D":
                os.write(fd, body)
            elif kind == b"R":
                size(*struct.unpack(">HH", body))
                os.kill(pid, signal.SIGWINCH)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def _size(rows: object, cols: object) -> tuple[int, int]:
    out = []
    for name, v in (("rows", rows), ("cols", cols)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1000:
            raise InvalidRequest(f"{name}: terminal size, 1 to 1000", param=name)
        out.append(v)
    return out[0], out[1]


def argv_shell(rows: object = 24, cols: object = 80) -> list[str]:
    """The exec that runs an interactive bash on a PTY of `rows` × `cols`."""
    r, c = _size(rows, cols)
    return ["python", "-c", HELPER, str(r), str(c)]


def data(keys: bytes) -> bytes:
    """Keys for the terminal, framed for the helper."""
    return b"D" + struct.pack(">I", len(keys)) + keys


def resize(rows: object, cols: object) -> bytes:
    """A resize, framed for the helper."""
    r, c = _size(rows, cols)
    return b"R" + struct.pack(">I", 4) + struct.pack(">HH", r, c)
