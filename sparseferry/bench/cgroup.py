"""Memory measured from outside the process: a command run in a memory-limited cgroup, page cache charged.

`MemoryCgroup.create()` makes a child cgroup with the memory controller: cgroup v2 (`memory.max`,
`memory.swap.max = 0`, `memory.peak`, `memory.events` oom_kill) where a writable v2 hierarchy has it,
else cgroup v1 (`memory.limit_in_bytes`, `memory.memsw.limit_in_bytes` where swap accounting exists,
`memory.max_usage_in_bytes`, `memory.oom_control` oom_kill). Both charge the page cache a process
faults in to its cgroup, so the limit covers what it reads through the cache too. It returns None
(with the reason in `MemoryCgroup.unavailable`) where neither can be created, e.g. without root.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

V2_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
V1_ROOT = "/sys/fs/cgroup/memory"


@dataclass
class CgroupRun:
    returncode: int
    oom_killed: bool
    peak_bytes: int
    limit_bytes: int
    seconds: float
    stdout: str
    stderr: str


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class MemoryCgroup:
    unavailable: str = ""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @classmethod
    def create(cls, name: str = "sparseferry") -> "MemoryCgroup | None":
        reasons = []
        for root in V2_ROOTS:
            r = Path(root)
            try:
                if "memory" not in (r / "cgroup.controllers").read_text().split():
                    reasons.append(f"{root}: no memory controller")
                    continue
                if "memory" not in (r / "cgroup.subtree_control").read_text().split():
                    _write(r / "cgroup.subtree_control", "+memory")
                p = r / f"{name}-{os.getpid()}"
                p.mkdir(exist_ok=True)
                if (p / "memory.max").exists():
                    return cls(p, 2)
                p.rmdir()
                reasons.append(f"{root}: child has no memory.max")
            except OSError as e:
                reasons.append(f"{root}: {e.strerror or e}")
        try:
            p = Path(V1_ROOT) / f"{name}-{os.getpid()}"
            p.mkdir(exist_ok=True)
            if (p / "memory.limit_in_bytes").exists():
                return cls(p, 1)
            reasons.append(f"{V1_ROOT}: child has no memory.limit_in_bytes")
        except OSError as e:
            reasons.append(f"{V1_ROOT}: {e.strerror or e}")
        cls.unavailable = "; ".join(reasons)
        return None

    def set_limit(self, nbytes: int | None) -> None:
        """Hard limit on memory + page cache (no swap); None: unlimited."""
        if self.version == 2:
            _write(self.path / "memory.max", "max" if nbytes is None else str(nbytes))
            if (self.path / "memory.swap.max").exists():
                _write(self.path / "memory.swap.max", "0")
            return
        v = "-1" if nbytes is None else str(nbytes)
        memsw = self.path / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # memory + swap must stay >= memory: lift it first, then pin it to the limit
            _write(memsw, "-1")
        _write(self.path / "memory.limit_in_bytes", v)
        if memsw.exists():
            _write(memsw, v)

    def _reset_peak(self) -> None:
        if self.version == 1:
            _write(self.path / "memory.max_usage_in_bytes", "0")
            if (self.path / "memory.memsw.max_usage_in_bytes").exists():
                _write(self.path / "memory.memsw.max_usage_in_bytes", "0")
        elif (self.path / "memory.peak").exists():
            try:
                _write(self.path / "memory.peak", "reset")  # kernels >= 6.12; older ones keep the peak of the cgroup
            except OSError:
                pass

    def peak(self) -> int:
        f = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        p = self.path / f
        return int(p.read_text().split()[0]) if p.exists() else -1

    def oom_kills(self) -> int:
        f = self.path / ("memory.oom_control" if self.version == 1 else "memory.events")
        for line in f.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return int((self.path / "memory.failcnt").read_text()) if self.version == 1 and (self.path / "memory.failcnt").exists() else 0

    def prepare(self, limit: int | None) -> None:
        """Set the limit (None: unlimited) and start a measurement: peak reset, OOM kills counted from now."""
        self.set_limit(limit)
        self._reset_peak()
        self._kills = self.oom_kills()

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` as a command that enters this cgroup, then execs (the pid stays the same; no preexec_fn,
        so safe from a process with threads)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *cmd]

    def outcome(self) -> tuple[int, bool]:
        """(peak charge since `prepare`, whether a process was OOM-killed since)."""
        return self.peak(), self.oom_kills() > getattr(self, "_kills", 0)

    def run(self, cmd: list[str], *, limit: int | None, env=None, timeout: float = 1800) -> CgroupRun:
        """Run `cmd` inside the cgroup under `limit` bytes (None: unlimited); its peak and whether it was OOM-killed."""
        self.set_limit(limit)
        self._reset_peak()
        kills = self.oom_kills()
        procs = str(self.path / "cgroup.procs")

        def enter():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, preexec_fn=enter)
        secs = time.perf_counter() - t0
        return CgroupRun(out.returncode, self.oom_kills() > kills, self.peak(), limit or -1, secs, out.stdout, out.stderr)

    def remove(self) -> None:
        try:
            self.set_limit(None)
            self.path.rmdir()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


# What generate does before it loads weights: imports, the tokenizer, the model skeleton on meta.
IDLE = """import sys, sparseferry, sparseferry.cli
from sparseferry.hf import info_from_config_dict
from sparseferry.runtime import load_tokenizer
from sparseferry.store import open_checkpoint
tok = load_tokenizer(sys.argv[1]); tok(["warm up"] * 8, return_tensors="pt", padding=True)
info_from_config_dict(open_checkpoint(sys.argv[1]).config)
"""


def prompt_of(ckpt_dir: Path, ntokens: int) -> str:
    """A text that tokenizes to `ntokens` tokens with the checkpoint's tokenizer."""
    from ..runtime import load_tokenizer

    tok = load_tokenizer(ckpt_dir)
    text = " ".join(f"the river carried boat number {i} past the old mill" for i in range(ntokens))
    ids = tok(text, add_special_tokens=False)["input_ids"][:ntokens]
    return tok.decode(ids)


def measure_generate(ckpt_dir, *, budget: str, batches, prompt_tokens: int, new_tokens: int, extra_bytes: int = 0,
            python: str = sys.executable) -> dict | None:
    """Run `sparseferry generate` per batch size in a memory cgroup of idle footprint + budget + allowance
    (+ extra_bytes), after emptying the page cache of the checkpoint; None where no cgroup can be made."""
    from ..io import drop_cache
    from ..runtime.allowance import allowance
    from ..runtime.budget import parse_budget
    from ..store import open_checkpoint

    ckpt_dir = Path(ckpt_dir)
    ckpt = open_checkpoint(ckpt_dir)
    budget_bytes = parse_budget(budget, ckpt.stored_bytes())
    cg = MemoryCgroup.create("sparseferry-bench")
    if cg is None:
        return None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    prompt = prompt_of(ckpt_dir, prompt_tokens)
    rows = []
    with cg:
        idle = cg.run([python, "-c", IDLE, str(ckpt_dir)], limit=None, env=env)
        if idle.returncode != 0:
            raise RuntimeError(f"idle run failed: {idle.stderr[-2000:]}")
        for batch in batches:
            a = allowance(ckpt.config, batch, prompt_tokens, new_tokens)
            limit = idle.peak_bytes + budget_bytes + a["total"] + extra_bytes
            drop_cache([ckpt_dir / rel for rel in ckpt.files])
            cmd = [python, "-m", "sparseferry.cli", "generate", str(ckpt_dir), "--max-new-tokens", str(new_tokens),
                   "--budget", str(budget_bytes), "--json"] + [x for _ in range(batch) for x in ("--prompt", prompt)]
            r = cg.run(cmd, limit=limit, env=env)
            summary = {}
            if r.returncode == 0:
                summary = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append({"batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                         "completed": r.returncode == 0, "returncode": r.returncode, "oom_killed": r.oom_killed,
                         "limit_bytes": limit, "peak_bytes": r.peak_bytes, "idle_bytes": idle.peak_bytes,
                         "budget_bytes": budget_bytes, "allowance": a, "seconds": r.seconds,
                         "decode_tokens_per_s": summary.get("decode_tokens_per_s"),
                         "peak_rss_bytes": summary.get("peak_rss_bytes"),
                         "error": r.stderr.strip().splitlines()[-1] if r.returncode and r.stderr.strip() else None})
    return {"checkpoint": str(ckpt_dir), "cgroup": f"v{cg.version}", "budget": budget, "rows": rows}
