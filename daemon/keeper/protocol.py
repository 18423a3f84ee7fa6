"""What the daemon and its keeper say over their unix socket: frames of a 9-byte header (kind, job handle, payload
length) and a payload. Output frames carry the job's bytes as they are; the others carry fields separated by NUL
(`pack`): an argument, a variable or a path cannot hold NUL, and this costs the keeper neither `json` (0.6 MiB of
RSS with the `re` it imports) nor the daemon a JSON encoding of every job's environment.

The keeper keeps of each stream what a daemon's capture keeps (output.StreamCapture): the first `cap` + 1 bytes
and the last `cap - cap // 4`. A daemon that attaches says how many bytes of each stream it already has; the
keeper sends the rest, or, if that fell between head and tail, a SKIP to the tail: the row ends exactly as if
one daemon had read every byte.
"""

from __future__ import annotations

import os
import socket
import struct

VERSION = 1
HEADER = struct.Struct("!BII")
MAX_PAYLOAD = 64 * 1024 * 1024  # a request or output frame is far smaller: a bigger one is refused, never held
DATA_CHUNK = 256 * 1024
HEAD_SHARE = 4  # as output.HEAD_SHARE (the keeper imports nothing of the daemon but this module)

# daemon -> keeper
HELLO = 1  # version[, EXIT_WHO]: the keeper answers HELLO version, pid, the keys of the attempts it holds...
SPAWN = 2  # key, cap, drain_s, cwd, argc, argv..., NAME=VALUE...: STARTED or FAILED
ATTACH = 3  # key, stdout bytes, stderr bytes (what the row has): STARTED (then the output from there) or UNKNOWN
SIGNAL = 4  # b"N": signal N to the job's process group
FORGET = 5  # b"1": the row is final (remove it); b"0": the daemon lets go of the job (it runs on)
HOLDS = 6  # keys...: the keeper answers HOLDS with those of them it holds (no key: all it holds)
# keeper -> daemon
STARTED = 11  # b"PID"
FAILED = 12  # why the job could not be started (UTF-8 text)
DATA_OUT = 13  # raw stdout bytes
DATA_ERR = 14  # raw stderr bytes
SKIP = 15  # stream (1 or 2), n: n bytes not sent (they fell between head and tail)
# b"CODE SIGNAL SENT CPU_MS": the job ended and all its output was sent; SIGNAL 0: none; SENT: the last signal the
# keeper sent its group while it ran (0: none), so that a SIGKILL nobody here sent can be told; CPU_MS: the CPU time
# of its main process (a cpu_seconds limit's SIGKILL is the kernel's). Those two only to a daemon whose HELLO said
# EXIT_WHO; a keeper before them sends CODE SIGNAL.
EXIT = 16
UNKNOWN = 17  # why: no such job here (UTF-8 text)
TAKEN = 18  # another daemon attached to the job: this one hears no more of it
STARTED_ALREADY = "was started already: not twice"  # how FAILED ends for a SPAWN of an attempt the keeper holds
EXIT_WHO = "exit-who"  # in a daemon's HELLO: it reads EXIT's SENT and CPU_MS


def frame(kind: int, handle: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, handle, len(payload)) + payload


def pack(*fields: str | int | float) -> bytes:
    """Fields separated by NUL (none may contain one: `has_nul` first). Undecodable bytes a str carries from the
    OS (surrogateescape) pass through."""
    return b"\0".join(str(f).encode("utf-8", "surrogateescape") for f in fields)


def unpack(payload: bytes) -> list[str]:
    return [f.decode("utf-8", "surrogateescape") for f in payload.split(b"\0")] if payload else []


def has_nul(*texts: str) -> bool:
    return any("\0" in text for text in texts)


def text(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")


class ProtocolError(Exception):
    """The peer sent what is not a frame of this protocol."""


class Frames:
    """Whole frames off the front of a byte stream. A frame bigger than MAX_PAYLOAD is never held: its bytes are
    dropped as they arrive, and it comes out as (kind, handle, None), so that the reader can refuse that one
    request and go on with the next."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._dropping = 0  # bytes of an oversized frame still to come

    def clear(self) -> None:
        self.buf.clear()
        self._dropping = 0

    def feed(self, data: bytes) -> list[tuple[int, int, bytes | None]]:
        if self._dropping:
            dropped = min(self._dropping, len(data))
            self._dropping -= dropped
            data = data[dropped:]
        self.buf += data
        frames: list[tuple[int, int, bytes | None]] = []
        at = 0
        while len(self.buf) - at >= HEADER.size:
            kind, handle, size = HEADER.unpack_from(self.buf, at)
            end = at + HEADER.size + size
            if size > MAX_PAYLOAD:
                frames.append((kind, handle, None))
                self._dropping = max(0, end - len(self.buf))
                at = min(end, len(self.buf))
                continue
            if end > len(self.buf):
                break
            frames.append((kind, handle, bytes(self.buf[at + HEADER.size:end])))
            at = end
        if at:
            del self.buf[:at]
        return frames


def address(database: str, host: str | None = None, uid: int | None = None) -> bytes:
    """The keeper's socket for this user (or `uid`) and database, in Linux's abstract namespace: nothing on disk to
    clean up or to lose with a private /tmp, gone with the keeper, and bound by one keeper only (the bind is the
    lock). Anyone may bind or connect to an abstract socket: the keeper serves only its own user, and the daemon
    talks only to a keeper of its own user (SO_PEERCRED both ways)."""
    import hashlib  # here, not at the top: OpenSSL's libcrypto would cost the keeper, which never calls this, 3 MiB

    if database.startswith(("postgresql://", "postgres://")):
        # A URL names the same database from any directory. Its keeper is this host's (by name: the identity
        # daemons sharing the database know each other by, so that hosts in UTS namespaces are hosts too).
        key = f"{host or socket.gethostname()}|{database}"
    else:
        key = os.path.realpath(database)  # a file path is made absolute first
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return f"\0nexus-jobd-keeper/v{VERSION}/{os.getuid() if uid is None else uid}/{digest}".encode()
