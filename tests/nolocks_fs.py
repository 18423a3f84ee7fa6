"""A real FUSE filesystem that grants every POSIX lock and tells nobody else, as Android's shared storage (/sdcard)
and some network filesystems do: the kernel sends it each lock (FUSE_POSIX_LOCKS), and it answers "granted" and
"no conflicting lock". Its files are those of a backing directory (a passthrough). No library: the FUSE protocol of
<linux/fuse.h>, spoken over /dev/fuse, and mount(2) through ctypes.

Run as `python nolocks_fs.py MOUNTPOINT BACKING` (as root): it mounts, prints "ready", and serves until unmounted.
The tests use `mounted()`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("=IiQ")  # len, error, unique
# ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev blksize flags
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")
ENTRY = struct.Struct("=QQQQII")  # nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec
INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags
# major minor max_readahead flags max_background congestion_threshold max_write time_gran max_pages map_alignment
# flags2 max_stack_depth, then 24 bytes unused: 64 in all
INIT_OUT = struct.Struct("=IIIIHHIIHHII")
FUSE_POSIX_LOCKS = 1 << 1
F_UNLCK = 2
LOOKUP, FORGET, GETATTR, SETATTR, MKNOD, UNLINK = 1, 2, 3, 4, 8, 10
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC, FLUSH, INIT = 14, 15, 16, 17, 18, 20, 25, 26
GETLK, SETLK, SETLKW, ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET = 31, 32, 33, 34, 35, 36, 38, 42
NO_REPLY = (FORGET, BATCH_FORGET, INTERRUPT)
SETATTR_MODE, SETATTR_SIZE = 1 << 0, 1 << 3


class Served:
    """The filesystem: node ids for the backing directory's paths, file handles for open files."""

    def __init__(self, backing: Path) -> None:
        self.paths = {1: backing}
        self.ids = {backing: 1}
        self.files: dict[int, int] = {}  # fh -> fd

    def node(self, path: Path) -> int:
        if path not in self.ids:
            self.ids[path] = len(self.paths) + 1
            self.paths[self.ids[path]] = path
        return self.ids[path]

    def attr(self, path: Path) -> bytes:
        st = os.lstat(path)
        return ATTR.pack(st.st_ino, st.st_size, st.st_blocks, int(st.st_atime), int(st.st_mtime), int(st.st_ctime),
                         0, 0, 0, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, 0, 4096, 0)

    def entry(self, path: Path) -> bytes:
        return ENTRY.pack(self.node(path), 0, 0, 0, 0, 0) + self.attr(path)

    def open(self, path: Path, flags: int, mode: int = 0) -> bytes:
        fd = os.open(path, flags, mode)
        self.files[fd] = fd
        return struct.pack("=QIi", fd, 0, 0)

    def answer(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        """The reply's body; an OSError becomes the reply's errno."""
        if opcode in (FLUSH, FSYNC, ACCESS, SETLK, SETLKW, DESTROY):
            return b""  # SETLK: granted, whoever holds what: the point of this filesystem
        if opcode == GETLK:
            return struct.pack("=QQII", 0, 0, F_UNLCK, 0)  # nobody holds a lock
        handler = self.HANDLERS.get(opcode)
        if handler is None:
            raise OSError(errno.ENOSYS, "not implemented")
        return handler(self, self.paths.get(nodeid, Path("/nonexistent")), body)

    def _init(self, _path: Path, body: bytes) -> bytes:
        readahead = INIT_IN.unpack_from(body)[2]
        return INIT_OUT.pack(7, 31, readahead, FUSE_POSIX_LOCKS, 16, 12, 1 << 17, 1, 32, 0, 0, 0) + bytes(24)

    def _lookup(self, path: Path, body: bytes) -> bytes:
        return self.entry(path / _name(body))

    def _getattr(self, path: Path, _body: bytes) -> bytes:
        return struct.pack("=QII", 0, 0, 0) + self.attr(path)

    def _setattr(self, path: Path, body: bytes) -> bytes:
        valid, _pad, _fh, size = struct.unpack_from("=IIQQ", body)
        if valid & SETATTR_SIZE:
            os.truncate(path, size)
        if valid & SETATTR_MODE:
            os.chmod(path, struct.unpack_from("=I", body, 68)[0] & 0o7777)
        return struct.pack("=QII", 0, 0, 0) + self.attr(path)

    def _create(self, path: Path, body: bytes) -> bytes:
        flags, mode = struct.unpack_from("=II", body)
        handle = self.open(path / _name(body[16:]), flags | os.O_CREAT, mode & 0o7777)
        return self.entry(path / _name(body[16:])) + handle

    def _mknod(self, path: Path, body: bytes) -> bytes:
        mode = struct.unpack_from("=I", body)[0]
        os.close(os.open(path / _name(body[16:]), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode & 0o7777))
        return self.entry(path / _name(body[16:]))

    def _open(self, path: Path, body: bytes) -> bytes:
        return self.open(path, struct.unpack_from("=I", body)[0] & ~(os.O_CREAT | os.O_TRUNC))

    def _read(self, _path: Path, body: bytes) -> bytes:
        fh, offset, size = struct.unpack_from("=QQI", body)
        return os.pread(self.files[fh], size, offset)

    def _write(self, _path: Path, body: bytes) -> bytes:
        fh, offset, size = struct.unpack_from("=QQI", body)
        return struct.pack("=II", os.pwrite(self.files[fh], body[40:40 + size], offset), 0)

    def _release(self, _path: Path, body: bytes) -> bytes:
        os.close(self.files.pop(struct.unpack_from("=Q", body)[0]))
        return b""

    def _unlink(self, path: Path, body: bytes) -> bytes:
        os.unlink(path / _name(body))
        return b""

    def _statfs(self, path: Path, _body: bytes) -> bytes:
        st = os.statvfs(path)
        return struct.pack("=QQQQQIIII", st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree,
                           st.f_bsize, st.f_namemax, st.f_frsize, 0) + bytes(24)

    HANDLERS: ClassVar[dict[int, Callable[[Served, Path, bytes], bytes]]] = {
        INIT: _init, LOOKUP: _lookup, GETATTR: _getattr, SETATTR: _setattr, CREATE: _create, MKNOD: _mknod,
        OPEN: _open, READ: _read, WRITE: _write, RELEASE: _release, UNLINK: _unlink, STATFS: _statfs}


def _name(body: bytes) -> str:
    return body.split(b"\0", 1)[0].decode(errors="surrogateescape")


def serve(mountpoint: Path, backing: Path) -> None:
    fd = os.open("/dev/fuse", os.O_RDWR)
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(b"nolocks", os.fsencode(mountpoint), b"fuse", 0, options) != 0:
        raise OSError(ctypes.get_errno(), f"mount {mountpoint}: {os.strerror(ctypes.get_errno())}")
    print("ready", flush=True)
    served = Served(backing)
    while True:
        try:
            request = os.read(fd, 1 << 20)
        except OSError as e:
            if e.errno == errno.ENODEV:  # unmounted
                return
            if e.errno in (errno.EINTR, errno.ENOENT):  # interrupted, or a request withdrawn meanwhile
                continue
            raise
        length, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(request)
        if opcode in NO_REPLY:
            continue
        try:
            body, error = served.answer(opcode, nodeid, request[IN_HEADER.size:length]), 0
        except OSError as e:
            body, error = b"", -(e.errno or errno.EIO)
        with contextlib.suppress(FileNotFoundError):  # the request was interrupted meanwhile
            os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), error, unique) + body)


@contextlib.contextmanager
def mounted(mountpoint: Path, backing: Path) -> Iterator[Path]:
    """The filesystem at `mountpoint` (made here, the backing directory too), served by a process of its own;
    unmounted after."""
    mountpoint.mkdir(mode=0o700)
    backing.mkdir(mode=0o700)
    server = subprocess.Popen([sys.executable, __file__, str(mountpoint), str(backing)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert server.stdout is not None
    if server.stdout.readline().strip() != "ready":
        server.kill()
        raise AssertionError(f"the FUSE filesystem did not mount: {server.communicate()[1]}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def can_mount() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


if __name__ == "__main__":
    serve(Path(sys.argv[1]), Path(sys.argv[2]))
