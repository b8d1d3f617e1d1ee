"""Experts in memory: a pool of slots filled by a reader thread, on demand or ahead of the router.

A mixture-of-experts layer uses a few of its experts per token. Each expert of each layer is one
contiguous byte range of the layer's file (docs/FORMAT.md 2b), so it can be read on its own. The
pool holds `nslots` experts (each slot is as large as the largest expert's aligned read); which
ones stay is decided here:

    demand     the router of layer i chose experts S: those not in the pool are read now, first
    prefetch   a prediction of the next layer's choice: read behind the demand reads, into slots
               whose expert is neither in use nor awaited; dropped when no such slot is free
    eviction   least frequently used first (use counts halve every few pool-fulls, so the pool
               follows a routing that drifts), ties broken by least recently used

The compute side calls `begin(layer, experts)` once the router has chosen, then `take` returns the
chosen experts one by one as they are ready (those already in memory first, so the reads of the
others overlap their compute), `done` after each. A wrong prediction costs a read; a result always
comes from the expert the router chose, read and checksum-verified.

Counters (`ExpertStats`): every chosen expert is a hit (in the pool, no read for this use), a
predicted read (read ahead, then used) or a missed read (read after the router chose it); a
prefetch never used before it was evicted or its layer had run is wasted.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from ..io import FileReader, aligned_empty, buffer_size_for
from ..store import Checkpoint

Key = tuple[int, int]  # (layer, expert)


@dataclass
class ExpertStats:
    uses: int = 0  # chosen experts, summed over layer calls (a batch counts the union once)
    hits: int = 0
    predicted: int = 0
    missed: int = 0
    wasted: int = 0
    prefetches: int = 0  # prefetch reads started
    bytes_read: int = 0  # disk (aligned ranges as read) or host -> device
    routed_bytes: int = 0  # stored bytes of the chosen experts (what routing needs without a cache)
    read_s: float = 0.0
    wait_s: float = 0.0  # compute side blocked in take()

    def snapshot(self) -> "ExpertStats":
        return ExpertStats(**vars(self))


def expert_slot_bytes(ckpt: Checkpoint, layers=None) -> int:
    """Bytes of one pool slot: the largest aligned read of one expert of `layers` (default: every layer)."""
    best = 0
    for i in range(ckpt.num_layers) if layers is None else layers:
        for e in range(ckpt.num_experts(i)):
            _, a, z = ckpt.expert_range(i, e)
            best = max(best, buffer_size_for(a, z))
    return best


def expert_keys(ckpt: Checkpoint, layers=None) -> list[Key]:
    """Every (layer, expert) of `layers`, expert-major so that a partial preload spreads over the layers."""
    moe = [i for i in (range(ckpt.num_layers) if layers is None else layers) if ckpt.num_experts(i)]
    most = max((ckpt.num_experts(i) for i in moe), default=0)
    return [(i, e) for e in range(most) for i in moe if e < ckpt.num_experts(i)]


class ExpertCache:
    """`nslots` experts in memory on `device`, read from the checkpoint (disk) or from host bytes.

    host: {layer: [uint8 tensor of expert e's bytes, verified]} for storage "host";
    on a CPU device those bytes are used in place (no slots), on CUDA they are copied into slots.
    """

    AGING = 8  # use counts halve every AGING * nslots uses

    def __init__(self, ckpt: Checkpoint, device: torch.device, nslots: int, slot_bytes: int, *,
                 storage: str = "disk", direct: bool = True, host: dict | None = None):
        self.ckpt, self.device, self.storage = ckpt, device, storage
        self.cuda = device.type == "cuda"
        self.direct = direct
        self.stats = ExpertStats()
        self.in_place = storage == "host" and not self.cuda  # experts used where they lie in host memory
        self.host = host or {}
        self.nslots = 0 if self.in_place else nslots
        self.slot_bytes = slot_bytes
        if self.nslots:
            pool = (torch.empty(self.nslots * slot_bytes, dtype=torch.uint8, device=device) if self.cuda
                    else aligned_empty(self.nslots * slot_bytes))
            self.slots = [pool[k * slot_bytes : (k + 1) * slot_bytes] for k in range(self.nslots)]
        else:
            self.slots = []
        self.staging = aligned_empty(slot_bytes, pin=True) if self.cuda and storage == "disk" and slot_bytes else None
        self.readers: dict[int, FileReader] = {}
        self.cv = threading.Condition()
        self.thread: threading.Thread | None = None
        self._clear()

    # -- state, guarded by cv
    def _clear(self) -> None:
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * self.nslots
        self.ready: dict[int, dict] = {}  # slot -> expert views (absent while loading)
        self.pinned: set[int] = set()
        self.needed: set[Key] = set()  # chosen by a router, not yet computed
        self.fresh: set[Key] = set()  # prefetched, not yet used
        self.freq: dict[Key, float] = {}
        self.last: dict[Key, int] = {}
        self.tick = 0
        self.demand: deque[Key] = deque()
        self.ahead: deque[Key] = deque()
        self.error: BaseException | None = None
        self.stop = False

    def _start(self) -> None:
        if self.thread is None and self.nslots:
            self.stop = False
            self.thread = threading.Thread(target=self._reader, name="sparseferry-experts", daemon=True)
            self.thread.start()

    def close(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        for r in self.readers.values():
            r.close()
        self.readers.clear()

    # -- the compute side
    def preload(self, keys: list[Key], progress=None) -> None:
        """Fill the pool with `keys` (at most nslots of them) before the first token; not counted."""
        if self.in_place:
            return
        before = self.stats.snapshot()
        for key in keys[: self.nslots]:
            k = len(self.slot_of)
            self.ready[k] = self._fill(k, key)
            self.slot_of[key], self.key_of[k] = k, key
            if progress is not None:
                progress.update(1)
        self.stats = before

    def begin(self, layer: int, experts: list[int]) -> None:
        """The router of `layer` chose `experts` (distinct): count them, read the missing ones first."""
        self._start()
        with self.cv:
            self.ahead = deque(k for k in self.ahead if k[0] != layer)  # too late to be ahead
            for e in experts:
                key = (layer, e)
                self.stats.uses += 1
                self.stats.routed_bytes += self.ckpt.expert_bytes(layer, e)
                self.needed.add(key)
                if self.in_place:
                    self.stats.hits += 1
                elif key in self.fresh:
                    self.stats.predicted += 1
                    self.fresh.discard(key)
                elif key in self.slot_of:
                    self.stats.hits += 1
                else:
                    self.stats.missed += 1
                    self.demand.append(key)
            self.cv.notify_all()

    def prefetch(self, layer: int, experts) -> None:
        """Read `layer`'s experts `experts` ahead of its router, as slots allow (a guess: never waited for)."""
        if self.in_place or not self.nslots:
            return
        self._start()
        n = self.ckpt.num_experts(layer)
        with self.cv:
            for e in experts:
                key = (layer, int(e))
                if 0 <= key[1] < n and key not in self.slot_of and key not in self.ahead:
                    self.ahead.append(key)
            self.cv.notify_all()

    def take(self, layer: int, remaining: set[int]) -> tuple[int, dict]:
        """One of `remaining` (experts of `layer` passed to begin) that is in memory: (expert, views), pinned."""
        if self.in_place:
            e = min(remaining)
            return e, self._host_views(layer, e)
        t0 = time.perf_counter()
        with self.cv:
            while True:
                if self.error is not None:
                    err = self.error
                    self._reset_locked()
                    raise err
                for e in sorted(remaining):
                    k = self.slot_of.get((layer, e))
                    if k is not None and k in self.ready:
                        self.pinned.add(k)
                        self.stats.wait_s += time.perf_counter() - t0
                        return e, self.ready[k]
                self.cv.wait(0.1)

    def done(self, layer: int, e: int) -> None:
        """Compute has finished with expert e of `layer`: it may be evicted again."""
        key = (layer, e)
        with self.cv:
            self.needed.discard(key)
            k = self.slot_of.get(key)
            if k is not None:
                self.pinned.discard(k)
            self.tick += 1
            self.freq[key] = self.freq.get(key, 0.0) + 1.0
            self.last[key] = self.tick
            if self.nslots and self.tick % (self.AGING * self.nslots) == 0:
                self.freq = {q: f / 2 for q, f in self.freq.items()}
            self.cv.notify_all()

    def end_layer(self, layer: int) -> None:
        """`layer` has run: its prefetched experts that were not chosen were wasted reads."""
        with self.cv:
            unused = [k for k in self.fresh if k[0] == layer]
            self.stats.wasted += len(unused)
            self.fresh.difference_update(unused)

    def resident(self) -> int:
        return len(self.slot_of) if not self.in_place else sum(self.ckpt.num_experts(i) for i in self.host)

    def _reset_locked(self) -> None:
        """After a failed read: forget everything (slots may hold half-read bytes); the thread restarts."""
        self.stop = True
        self.cv.notify_all()
        thread, self.thread = self.thread, None
        self.cv.release()
        try:
            if thread is not None:
                thread.join()
        finally:
            self.cv.acquire()
        stats = self.stats
        self._clear()
        self.stats = stats

    # -- the reader thread
    def _victim(self, demand: bool) -> int | None:
        free = [k for k in range(self.nslots) if self.key_of[k] is None]
        if free:
            return free[0]
        cands = [k for k, key in enumerate(self.key_of)
                 if k in self.ready and k not in self.pinned and key not in self.needed
                 and (demand or key not in self.fresh)]
        if not cands:
            return None
        return min(cands, key=lambda k: (self.key_of[k] in self.fresh, self.freq.get(self.key_of[k], 0.0),
                                         self.last.get(self.key_of[k], 0)))

    def _reader(self) -> None:
        while True:
            with self.cv:
                while True:
                    if self.stop:
                        return
                    queue = self.demand if self.demand else self.ahead
                    if queue and queue[0] in self.slot_of:
                        queue.popleft()
                        continue
                    if queue:
                        demand = queue is self.demand
                        k = self._victim(demand)
                        if k is not None:
                            key = queue.popleft()
                            break
                        if not demand:
                            self.ahead.clear()  # no room to guess ahead
                            continue
                    self.cv.wait(0.1)
                old = self.key_of[k]
                if old is not None:
                    del self.slot_of[old]
                    if old in self.fresh:
                        self.fresh.discard(old)
                        self.stats.wasted += 1
                self.ready.pop(k, None)
                self.slot_of[key], self.key_of[k] = k, key
                if not demand:
                    self.stats.prefetches += 1
                    self.fresh.add(key)  # a guess from now on, also while it is read: its use counts as predicted
            try:
                views = self._fill(k, key)
            except BaseException as e:  # noqa: BLE001 - raised on the compute side
                with self.cv:
                    self.error = e
                    self.cv.notify_all()
                return
            with self.cv:
                if self.stop:
                    return
                self.ready[k] = views
                self.cv.notify_all()

    def _fill(self, k: int, key: Key) -> dict:
        """Read expert `key` into slot k (verified) and return its views; also used by preload."""
        i, e = key
        t0 = time.perf_counter()
        slot = self.slots[k]
        if self.storage == "host":
            data = self._host_bytes(i, e)
            slot[: data.numel()].copy_(data)
            data = slot[: data.numel()]
            nbytes = data.numel()
        else:
            reader = self.readers.get(i)
            if reader is None:
                reader = self.readers[i] = self.ckpt.open_reader(i, direct=self.direct)
            if self.cuda:
                host = self.ckpt.read_expert(i, e, self.staging, reader=reader)
                slot[: host.numel()].copy_(host)
                data = slot[: host.numel()]
            else:
                data = self.ckpt.read_expert(i, e, slot, reader=reader)
            _, a, z = self.ckpt.expert_range(i, e)
            nbytes = buffer_size_for(a, z) if reader.direct else z - a
        views = self.ckpt.expert_views(i, e, data)
        self.stats.bytes_read += nbytes
        self.stats.read_s += time.perf_counter() - t0
        return views

    def _host_bytes(self, i: int, e: int) -> torch.Tensor:
        return self.host[i][e]

    def _host_views(self, i: int, e: int) -> dict:
        return self.ckpt.expert_views(i, e, self._host_bytes(i, e))
