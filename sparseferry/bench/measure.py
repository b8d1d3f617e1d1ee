"""Timing one system inside its own process: forward passes, disk bytes, repetitions, the worker protocol.

Both runners (`accelerate_baseline`, `sparseferry_runner`) load their model their own way, then hand
it to `measure`, so the two are timed by the same code:

  * a `PassMeter` hooks the top-level model: every forward pass (the prefill, then one pass per decoded
    token) gets its wall time and the bytes this process read from the storage layer in it
    (`/proc/self/io` read_bytes: page faults of memory-mapped files and O_DIRECT reads alike);
  * before each pass it can empty the page cache of given folders (excluded from the timing), which is
    how a machine whose RAM cannot hold the model behaves;
  * decode time per step runs from the end of the prefill to the end of the last pass, cache-emptying
    time subtracted: sampling and any overlap a system gets between passes count as they would live.

A worker is `python -m sparseferry.bench.<runner> SPEC.json RESULT.json`; it prints one JSON event per
line on stdout (`{"event": "load"}`, `{"event": "rep", "i": 1, "of": 4}`) for the parent's progress
display and writes its result to RESULT.json.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import drop_cache


def io_read_bytes() -> int:
    """Bytes this process (all its threads) caused to be fetched from storage; 0 where unsupported."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set of this process image (VmHWM). Not ru_maxrss: that survives execve, so a worker
    would report its parent's peak (the parent forked it with its own high-water mark)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def event(name: str, **kw) -> None:
    """One progress event for the parent (a JSON line on stdout)."""
    print(json.dumps({"event": name, **kw}), flush=True)


@dataclass
class Pass:
    batch: int
    tokens: int  # positions computed (prompt length for the prefill, 1 for a decode step)
    t0: float
    t1: float
    bytes_read: int
    drop_s: float  # time spent emptying the page cache just before this pass (not in t0..t1)


class PassMeter:
    """Forward hooks on `model` recording a Pass per top-level forward; empties `drop_paths` before each."""

    def __init__(self, model: torch.nn.Module, drop_paths=()):
        self.drop_paths = [Path(p) for p in drop_paths]
        self.passes: list[Pass] = []
        self._open = None
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        t = time.perf_counter()
        if self.drop_paths:
            drop_cache(self.drop_paths)
        t0 = time.perf_counter()
        self._open = (tuple(ids.shape[:2]), t0, io_read_bytes(), t0 - t)

    def _post(self, module, args, kwargs, output):
        (b, n), t0, r0, drop_s = self._open
        self.passes.append(Pass(b, n, t0, time.perf_counter(), io_read_bytes() - r0, drop_s))
        self._open = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def summarize(passes: list[Pass]) -> dict:
    """Prefill and per-step decode figures of one generate() call's passes (first pass = prefill)."""
    pre, dec = passes[0], passes[1:]
    batch = pre.batch
    out = {"prefill_s": pre.t1 - pre.t0, "prefill_bytes_read": pre.bytes_read, "decode_steps": len(dec)}
    if dec:
        step = (dec[-1].t1 - pre.t1 - sum(p.drop_s for p in dec)) / len(dec)
        per_step_bytes = sum(p.bytes_read for p in dec) / len(dec)
        out.update(decode_s_per_step=step, decode_s_per_token=step / batch, tokens_per_s=batch / step,
                   bytes_read_per_step=per_step_bytes, bytes_read_per_token=per_step_bytes / batch,
                   pass_s=[p.t1 - p.t0 for p in dec])
    return out


def generate_once(model, input_ids: torch.Tensor, new_tokens: int, meter: PassMeter, pad_token_id: int) -> tuple[dict, list]:
    """Greedy-decode exactly `new_tokens` tokens; returns (summary of the passes, new token ids per row)."""
    meter.passes.clear()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
    return summarize(list(meter.passes)), out[:, input_ids.shape[1]:].tolist()


def measure(model, spec: dict, *, drop_paths=(), drop_each_pass: bool = False, stats=None) -> dict:
    """Warm up, then time `spec["reps"]` repetitions of greedy generation; medians and every repetition.

    Args:
        spec: the worker spec: prompt_ids (list of rows), new_tokens, warmup, reps, pad_token_id.
        drop_paths: folders whose page cache is emptied before each repetition (and before each forward
            pass when `drop_each_pass`).
        stats: optional callable run before each repetition with reset=True, after with reset=False,
            returning a dict of system-specific figures (the runtime's time split) kept per repetition.
    Returns:
        {"reps": [...], "tokens": new ids of the first measured repetition, "tokens_stable": all reps
        gave the same tokens, medians of prefill_s / decode_s_per_token / ..., "peak_rss_bytes"}.
    """
    ids = torch.tensor(spec["prompt_ids"], dtype=torch.long)
    meter = PassMeter(model, drop_paths if drop_each_pass else ())
    reps, tokens = [], []
    total = spec["warmup"] + spec["reps"]
    try:
        for i in range(total):
            event("rep", i=i + 1, of=total, warmup=i < spec["warmup"])
            drop_cache(drop_paths)
            if stats:
                stats(reset=True)
            s, toks = generate_once(model, ids, spec["new_tokens"], meter, spec["pad_token_id"])
            if stats:
                s["runtime"] = stats(reset=False)
            if i >= spec["warmup"]:
                reps.append(s)
                tokens.append(toks)
    finally:
        meter.close()
    out = {"reps": reps, "tokens": tokens[0], "tokens_stable": all(t == tokens[0] for t in tokens)}
    for k in ("prefill_s", "decode_s_per_step", "decode_s_per_token", "tokens_per_s", "bytes_read_per_step",
              "bytes_read_per_token"):
        vals = [r[k] for r in reps if r.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def versions() -> dict:
    """Versions of everything that shapes the numbers."""
    import platform

    import accelerate
    import transformers

    from .. import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "sparseferry": __version__, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}


def worker_main(run, argv=None) -> int:
    """Entry point of a worker: `run(spec) -> result dict`, spec read from argv[0], result written to argv[1]."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m sparseferry.bench.<runner> SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = run(spec)
    result.setdefault("versions", versions())
    Path(argv[1]).write_text(json.dumps(result, indent=1))
    event("done")
    return 0
