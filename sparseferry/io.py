"""Reading byte ranges of files the way an offloading engine must: around the page cache.

`read_range` fetches [start, end) of a file into a caller-supplied, reused buffer. With
`direct=True` (the default for disk storage) it opens the file with O_DIRECT and reads the 4 KiB
aligned range covering the request, so the bytes really come from the disk, not from RAM; where
O_DIRECT is refused (tmpfs, some network filesystems) it reads normally and then drops the pages
with posix_fadvise(DONTNEED). `drop_cache` empties the page cache of given files (for benchmarks).

A direct read larger than one chunk is split into ALIGN-aligned chunks read in parallel by a small
thread pool (`depth` requests in flight; os.preadv releases the GIL): one request at a time leaves
most of an SSD's bandwidth unused. The call still returns only when every byte is in `buf`, so for
its caller a parallel read is the same single, blocking read.
"""
from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch

ALIGN = 4096  # O_DIRECT alignment for offsets, lengths and buffer addresses
READ_DEPTH = 8  # direct requests in flight per read (`bench` measures the disk at 1..16)
READ_CHUNK = 4 << 20  # bytes per request of a parallel direct read (a multiple of ALIGN)

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(depth: int) -> ThreadPoolExecutor:
    """The shared pool of `depth` reader threads (one per depth, created on first use)."""
    with _pools_lock:
        pool = _pools.get(depth)
        if pool is None:
            pool = _pools[depth] = ThreadPoolExecutor(max_workers=depth, thread_name_prefix=f"sparseferry-read{depth}")
        return pool


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A uint8 tensor of `nbytes` whose data pointer is ALIGN-aligned (reuse it: allocation is costly)."""
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift : shift + nbytes]


def covering_range(start: int, end: int) -> tuple[int, int]:
    """The ALIGN-aligned [start, end) covering [start, end)."""
    a = start - start % ALIGN
    b = end + (-end) % ALIGN
    return a, b


def _readinto_all(fd: int, mv: memoryview, offset: int) -> int:
    """pread into mv until full or EOF; returns the number of bytes read."""
    done = 0
    n = len(mv)
    while done < n:
        got = os.preadv(fd, [mv[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def _read_chunks(fd: int, mv: memoryview, offset: int, depth: int, chunk: int) -> int:
    """Fill mv (from file offset `offset`) with up to `depth` chunk reads in flight; returns the
    number of bytes read contiguously from the start (short only at end of file), like _readinto_all."""
    if depth <= 1 or len(mv) <= chunk:
        return _readinto_all(fd, mv, offset)
    starts = range(0, len(mv), chunk)
    futs = [_pool(depth).submit(_readinto_all, fd, mv[c : c + chunk], offset + c) for c in starts]
    wait(futs)  # every chunk has landed (or failed) before buf is handed back
    got = [f.result() for f in futs]  # re-raises a chunk's OSError
    for c, n in zip(starts, got):
        if n < min(chunk, len(mv) - c):  # end of file inside this chunk
            return c + n
    return len(mv)


class FileReader:
    """An open file read by ranges, with O_DIRECT when asked for and possible.

    depth / chunk: direct reads larger than `chunk` bytes are split into chunks, `depth` of them in
    flight (depth 1: one request at a time).
    """

    def __init__(self, path: str | os.PathLike, direct: bool = True, *, depth: int = READ_DEPTH,
                 chunk: int = READ_CHUNK):
        self.fd = -1
        if depth < 1 or chunk < ALIGN or chunk % ALIGN:
            raise ValueError(f"read depth {depth} / chunk {chunk}: expected depth >= 1 and a chunk multiple of {ALIGN}")
        self.depth, self.chunk = int(depth), int(chunk)
        self.path = Path(path)
        self.direct = False
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDONLY)
        self.drop_after_read = direct and not self.direct  # fall back to fadvise DONTNEED
        self.size = os.fstat(self.fd).st_size

    def read_range(self, start: int, end: int, buf: torch.Tensor) -> torch.Tensor:
        """Read bytes [start, end) into `buf` (uint8, ALIGN-aligned, large enough for the covering range
        when direct); returns the uint8 view of exactly those bytes inside `buf`."""
        if end > self.size:
            raise OSError(errno.EIO, f"{self.path}: wanted bytes up to {end}, file has {self.size} (truncated?)")
        if self.direct:
            a, b = covering_range(start, end)
            b = min(b, self.size + (-self.size) % ALIGN)
            if buf.numel() < b - a or buf.data_ptr() % ALIGN:
                raise ValueError(f"buffer of {buf.numel()} bytes at {buf.data_ptr():#x} cannot take an aligned read of {b - a}")
            mv = memoryview(buf.numpy())[: b - a]
            try:
                got = _read_chunks(self.fd, mv, a, self.depth, self.chunk)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Filesystem accepted O_DIRECT at open but not for this read: fall back for good.
                os.close(self.fd)
                self.fd = os.open(self.path, os.O_RDONLY)
                self.direct, self.drop_after_read = False, True
                return self.read_range(start, end, buf)
            if got < end - a:
                raise OSError(errno.EIO, f"{self.path}: short read ({got} of {end - a} bytes at {a})")
            return buf[start - a : end - a]
        if buf.numel() < end - start:
            raise ValueError(f"buffer of {buf.numel()} bytes too small for {end - start}")
        view = buf[: end - start]
        got = _readinto_all(self.fd, memoryview(view.numpy()), start)
        if got < end - start:
            raise OSError(errno.EIO, f"{self.path}: short read ({got} of {end - start} bytes at {start})")
        if self.drop_after_read:
            os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)
        return view

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def buffer_size_for(start: int, end: int) -> int:
    """Bytes a buffer needs for a direct read of [start, end)."""
    a, b = covering_range(start, end)
    return b - a


def drop_cache(paths) -> None:
    """Evict the given files (or every file under given folders) from the page cache."""
    for p in paths:
        p = Path(p)
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)  # dirty pages (a file just written) cannot be dropped until written back
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
