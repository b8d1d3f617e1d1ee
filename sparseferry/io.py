"""Reading byte ranges of files the way an offloading engine must: around the page cache.

`read_range` fetches [start, end) of a file into a caller-supplied, reused buffer. With
`direct=True` (the default for disk storage) it opens the file with O_DIRECT and reads the 4 KiB
aligned range covering the request, so the bytes really come from the disk, not from RAM; where
O_DIRECT is refused (tmpfs, some network filesystems) it reads normally and then drops the pages
with posix_fadvise(DONTNEED). `drop_cache` empties the page cache of given files (for benchmarks).

A direct read larger than one chunk is split into ALIGN-aligned chunks read in parallel by a small
thread pool (`depth` requests in flight; os.preadv releases the GIL): one request at a time leaves
most of an SSD's bandwidth unused. The chunks of one read are equal and a multiple of `depth` in
number, so all `depth` requests stay in flight to the read's last byte instead of a few stragglers
finishing alone. `read_range` returns only when every byte is in `buf`; `submit` queues the same
read and returns at once (a `PendingRead`), so a caller can queue the next range while this one is
still in flight: the pool works through the queue in order and the disk never waits for the caller.
"""
from __future__ import annotations

import errno
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
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


def split_read(n: int, depth: int, chunk: int) -> tuple[int, int]:
    """How a direct read of n bytes (a multiple of ALIGN) is split: (chunk length, number of chunks).

    At most `chunk` bytes a request, and a multiple of `depth` requests of equal length (the last
    one shorter), so that `depth` stay in flight until the end."""
    if depth <= 1 or n <= chunk:
        return n, 1
    waves = -(-n // (depth * chunk))  # rounds of `depth` requests
    size = -(-n // (waves * depth))
    size += (-size) % ALIGN
    return size, -(-n // size)


def _timed_read(fd: int, mv: memoryview, offset: int) -> tuple[int, float]:
    return _readinto_all(fd, mv, offset), time.perf_counter()


class PendingRead:
    """A read in flight (`FileReader.submit`): `result()` waits for every byte and returns the view.

    `submitted` / `finished` (perf_counter seconds) bound the time the read was in flight, for the
    caller's statistics; `nbytes` is the length of the range asked for."""

    def __init__(self, reader: "FileReader", start: int, end: int, buf: torch.Tensor, a: int = 0,
                 chunks: list | None = None, view: torch.Tensor | None = None, submitted: float | None = None):
        self.reader, self.start, self.end, self.buf, self.a = reader, start, end, buf, a
        self.chunks = chunks or []  # [(offset in the aligned range, length, future)]
        self.view = view
        self.nbytes = end - start
        now = time.perf_counter()
        self.submitted = now if submitted is None else submitted  # a read done at once: when it began
        self.finished = now if view is not None else None

    def done(self) -> bool:
        return self.view is not None or all(f.done() for _, _, f in self.chunks)

    def result(self) -> torch.Tensor:
        if self.view is not None:
            return self.view
        wait([f for _, _, f in self.chunks])  # every chunk has landed (or failed) before buf is handed back
        r = self.reader
        try:
            got = [(c, n, f.result()) for c, n, f in self.chunks]  # re-raises a chunk's OSError
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # Filesystem accepted O_DIRECT at open but not for this read: fall back for good.
            r._fall_back_to_buffered()
            self.view = r.read_range(self.start, self.end, self.buf)
            self.finished = time.perf_counter()
            return self.view
        self.finished = max(t for _, _, (_, t) in got)
        total = 0  # bytes read contiguously from the start (short only at end of file)
        for c, n, (k, _) in got:
            total = c + k
            if k < n:
                break
        if total < self.end - self.a:
            raise OSError(errno.EIO, f"{r.path}: short read ({total} of {self.end - self.a} bytes at {self.a})")
        self.view = self.buf[self.start - self.a : self.end - self.a]
        return self.view


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
        self._retired: list[int] = []  # direct descriptors replaced by a buffered one (see _fall_back_to_buffered)
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
        return self.submit(start, end, buf).result()

    def submit(self, start: int, end: int, buf: torch.Tensor) -> PendingRead:
        """Queue the read of [start, end) into `buf` (as `read_range`) and return at once.

        A direct read larger than one chunk goes to the shared pool of `depth` reader threads, its
        chunks behind those of reads submitted before it; anything else is read here and now. `buf`
        belongs to the read until its `result()` has returned."""
        if end > self.size:
            raise OSError(errno.EIO, f"{self.path}: wanted bytes up to {end}, file has {self.size} (truncated?)")
        t0 = time.perf_counter()
        if not self.direct:
            return PendingRead(self, start, end, buf, view=self._read_buffered(start, end, buf), submitted=t0)
        a, b = covering_range(start, end)
        b = min(b, self.size + (-self.size) % ALIGN)
        if buf.numel() < b - a or buf.data_ptr() % ALIGN:
            raise ValueError(f"buffer of {buf.numel()} bytes at {buf.data_ptr():#x} cannot take an aligned read of {b - a}")
        mv = memoryview(buf.numpy())[: b - a]
        size, count = split_read(b - a, self.depth, self.chunk)
        if count == 1:  # one request: read here, its outcome handed over as a finished future
            fut: Future = Future()
            try:
                fut.set_result(_timed_read(self.fd, mv, a))
            except OSError as e:
                fut.set_exception(e)
            chunks = [(0, b - a, fut)]
        else:
            pool = _pool(self.depth)
            chunks = [(c, min(size, b - a - c), pool.submit(_timed_read, self.fd, mv[c : c + size], a + c))
                      for c in range(0, b - a, size)]
        return PendingRead(self, start, end, buf, a=a, chunks=chunks, submitted=t0)

    def _read_buffered(self, start: int, end: int, buf: torch.Tensor) -> torch.Tensor:
        if buf.numel() < end - start:
            raise ValueError(f"buffer of {buf.numel()} bytes too small for {end - start}")
        view = buf[: end - start]
        got = _readinto_all(self.fd, memoryview(view.numpy()), start)
        if got < end - start:
            raise OSError(errno.EIO, f"{self.path}: short read ({got} of {end - start} bytes at {start})")
        if self.drop_after_read:
            os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)
        return view

    def _fall_back_to_buffered(self) -> None:
        if not self.direct:
            return
        # The direct descriptor stays open until close(): other reads queued on it may still be
        # running, and a closed number could be reused by another file under them.
        self._retired.append(self.fd)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.direct, self.drop_after_read = False, True

    def close(self):
        for fd in getattr(self, "_retired", ()):
            os.close(fd)
        self._retired = []
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
