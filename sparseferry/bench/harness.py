"""`sparseferry bench`: every system on the same weights, prompt, lengths, batch, dtype and budget, back to back.

    prepare   the models: a synthetic pruned folder (or the user's), its unpruned twin (same shape and
              seed: the dense bytes Accelerate reads), and the sparseferry checkpoints converted from them;
    ceilings  disk read and memory bandwidth of this machine, now;
    systems   each in its own subprocess (clean RSS, fair peak memory), warmed up, then `reps` repetitions;
    report    the table, results.json and the plot (see `report`).

The budget is a share of the DENSE model's bytes (what Accelerate users mean by "30%"), passed as the
same number of bytes to every system. Disk runs empty the page cache before every repetition, and
Accelerate's before every forward pass (its offloaded weights are read through the page cache;
sparseferry's with O_DIRECT).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SparseferryError
from ..runtime.budget import parse_budget


class BenchError(SparseferryError):
    """A benchmark that cannot run as asked (bad model folder, a system that failed)."""


@dataclass(frozen=True)
class System:
    """One contender: which runner, on which weights, converted how."""

    name: str
    runner: str  # "accelerate" | "sparseferry"
    weights: str  # "pruned" (the model benchmarked) | "unpruned" (its dense twin, same shape and seed)
    convert: dict = field(default_factory=dict)  # keyword arguments of sparseferry.convert.convert
    baseline: bool = False  # the one speedups are relative to
    exact: bool = True  # stores the weights losslessly (False: quantized values, tokens may differ)


# The systems, in run order. A new value encoding is one more line here (its convert option).
SYSTEMS = (
    System("accelerate", "accelerate", "pruned", baseline=True),
    System("sparseferry-dense", "sparseferry", "unpruned"),
    System("sparseferry-bitmap", "sparseferry", "pruned"),
    System("sparseferry-bitmap-int8", "sparseferry", "pruned", convert={"values": "int8"}, exact=False),
    System("sparseferry-bitmap-int4", "sparseferry", "pruned", convert={"values": "int4"}, exact=False),
)
RUNNERS = {"accelerate": "sparseferry.bench.accelerate_baseline", "sparseferry": "sparseferry.bench.sparseferry_runner"}
PROMPT_TEXT = ("The ferry crossed the river at dawn, carrying carts, sheep and a tired postman. "
               "On the far bank the market was already loud with traders calling out their prices.")


def weight_bytes(folder) -> int:
    """Bytes of the weight files of a HuggingFace folder (*.safetensors, else *.bin)."""
    folder = Path(folder)
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    if not files:
        raise BenchError(f"{folder}: no weights (*.safetensors or *.bin)")
    return sum(f.stat().st_size for f in files)


def prompt_ids(model_dir, *, batch: int, length: int) -> tuple[list[list[int]], int]:
    """`batch` prompts of exactly `length` token ids (row b starts b characters into the text) and the pad id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = PROMPT_TEXT * (1 + length // 16)
    rows = []
    for b in range(batch):
        ids = tok(text[b:], add_special_tokens=False)["input_ids"][:length]
        if len(ids) < length:
            raise BenchError(f"{model_dir}: the tokenizer gives only {len(ids)} tokens for the prompt, {length} needed")
        rows.append(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return rows, int(pad)


def synth_pair(workdir, *, arch: str, params, sparsity: float, seed: int, vocab: int | None = None,
               progress: bool = True, dense: bool = True) -> tuple[Path, Path | None]:
    """The synthetic (pruned, unpruned) folders under `workdir`, made once and reused (unpruned: if `dense`)."""
    from ..synth import synth

    workdir = Path(workdir)
    tag = f"{arch}-{params}" + (f"-v{vocab}" if vocab else "")
    pruned = workdir / f"{tag}-sparsity{sparsity:g}-seed{seed}"
    synth(pruned, arch=arch, params=params, sparsity=sparsity, seed=seed, vocab=vocab, progress=progress)
    if not dense:
        return pruned, None
    twin = workdir / f"{tag}-sparsity0-seed{seed}"
    synth(twin, arch=arch, params=params, sparsity=0.0, seed=seed, vocab=vocab, progress=progress)
    return pruned, twin


def converted(src: Path, workdir: Path, options: dict, progress: bool) -> Path:
    """`src` converted with `options` into `workdir`, once (convert commits atomically: a folder is complete)."""
    from ..convert import convert

    suffix = "".join(f"-{k}={v}" for k, v in sorted(options.items()))
    dst = Path(workdir) / f"{src.name}-sf{suffix}"
    if not dst.exists():
        convert(src, dst, progress=progress, **options)
    return dst


def check_feasible(systems, ckpts: dict, budget_bytes: int, storage: str) -> None:
    """BenchError listing every system that cannot run under `budget_bytes` (with its minimum), or nothing.

    sparseferry's plan is made exactly as its worker's `load` will make it; Accelerate offloads any
    share of the weights, so it only needs a positive budget.
    """
    from ..runtime.budget import BudgetError, format_bytes
    from ..runtime.preflight import plan_for

    problems = []
    for s in systems:
        if s.runner != "sparseferry":
            continue
        try:
            plan_for(ckpts[s.name], budget_bytes, storage=storage, device="cpu")
        except BudgetError as e:
            need = f"needs at least {format_bytes(e.minimum_bytes)}" if e.minimum_bytes else str(e)
            problems.append(f"{s.name} {need}")
    if problems:
        raise BenchError(f"budget {format_bytes(budget_bytes)} is too small for: {'; '.join(problems)}. Raise --budget "
                         "(nothing was run)")


def _run_worker(runner: str, spec: dict, workdir: Path, label: str, bar=None) -> dict:
    """Run one system's worker subprocess; its JSON events move `bar`; returns its result."""
    fd, spec_path = tempfile.mkstemp(prefix="spec-", suffix=".json", dir=workdir)
    os.close(fd)
    res_path = Path(spec_path).with_name(Path(spec_path).name.replace("spec-", "result-"))
    Path(spec_path).write_text(json.dumps(spec))
    log = Path(workdir) / f"{label}.log"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", RUNNERS[runner], spec_path, str(res_path)], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env)
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if bar is not None:
                if ev.get("event") == "rep":
                    bar.set_postfix_str(f"{label}: {'warm-up' if ev['warmup'] else 'rep'} {ev['i']}/{ev['of']}")
                    bar.update(1)
                elif ev.get("event") == "load":
                    bar.set_postfix_str(f"{label}: loading")
        rc = proc.wait()
    os.unlink(spec_path)
    if rc != 0 or not res_path.exists():
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise BenchError(f"{label} failed (exit {rc}); last lines of {log}:\n{tail}")
    result = json.loads(res_path.read_text())
    res_path.unlink()
    return result


def bench(model_dir=None, *, out, budget="30%", storage: str = "disk", arch: str = "llama", params="1B",
          sparsity: float = 0.5, seed: int = 0, vocab: int | None = None, dense_dir=None, batch: int = 1,
          prompt_tokens: int = 32, new_tokens: int = 16, warmup: int = 1, reps: int = 3, threads: int | None = None,
          systems=SYSTEMS, workdir=None, plot: bool = True, progress: bool = True) -> dict:
    """Benchmark every system of `systems` and write results.json, results.md (and results.png) into `out`.

    Args:
        model_dir: a HuggingFace folder of a pruned model stored densely (as Accelerate users have it);
            None: a synthetic model (`arch`, `params`, `sparsity`, `seed`, `vocab`; see sparseferry.synth).
        dense_dir: the unpruned twin of `model_dir` for the "unpruned" systems (synthetic: made with it;
            user model without one: those systems are skipped).
        budget: share ("30%") of the dense weight bytes, or a size ("2GiB"); the same bytes for all systems.
        storage: "disk" (page cache emptied, reads from the disk) or "host" (streamed weights in RAM:
            sparseferry's host tier; Accelerate with its offloaded weights left in the page cache).
        batch / prompt_tokens / new_tokens: greedy decoding of `batch` prompts of `prompt_tokens` tokens.
        warmup / reps: untimed runs, then timed repetitions (medians reported).
        threads: torch threads in every system (default: torch's default).
        workdir: where models, checkpoints and logs go (default: out/work).
    Returns:
        the results dict written to results.json (see report.results_json).
    Raises:
        BenchError, SynthError, ConvertError with the folder or system at fault.
    """
    from tqdm import tqdm

    from . import ceilings, report
    from .measure import versions

    if storage not in ("disk", "host"):
        raise BenchError(f"storage {storage!r}: expected 'disk' or 'host'")
    if reps < 1 or warmup < 0 or batch < 1 or new_tokens < 2 or prompt_tokens < 1:
        raise BenchError(f"need reps >= 1, warmup >= 0, batch >= 1, new_tokens >= 2, prompt_tokens >= 1 "
                         f"(got {reps}, {warmup}, {batch}, {new_tokens}, {prompt_tokens})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(workdir) if workdir else out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    synthetic = model_dir is None
    if synthetic:
        model_dir, dense_dir = synth_pair(workdir / "models", arch=arch, params=params, sparsity=sparsity, seed=seed,
                                          vocab=vocab, progress=progress,
                                          dense=any(s.weights == "unpruned" for s in systems))
    model_dir = Path(model_dir)
    sources = {"pruned": model_dir, "unpruned": Path(dense_dir) if dense_dir else None}
    chosen = [s for s in systems if sources[s.weights] is not None]
    dense_bytes = weight_bytes(model_dir)
    budget_bytes = parse_budget(budget, dense_bytes)
    ids, pad = prompt_ids(model_dir, batch=batch, length=prompt_tokens)
    dtype = json.loads((model_dir / "config.json").read_text()).get("dtype") or "bfloat16"

    ckpts = {}
    for s in chosen:
        if s.runner == "sparseferry":
            ckpts[s.name] = converted(sources[s.weights], workdir, s.convert, progress)

    check_feasible(chosen, ckpts, budget_bytes, storage)  # every system, before the first (long) run
    mem = ceilings.memory_gbps()
    disk = ceilings.disk_read_gbps([model_dir], max_bytes=min(dense_bytes, 2 << 30))

    common = dict(prompt_ids=ids, new_tokens=new_tokens, warmup=warmup, reps=reps, pad_token_id=pad, threads=threads,
                  budget_bytes=budget_bytes)
    bar = tqdm(total=len(chosen) * (warmup + reps), unit="run", desc="bench", disable=not progress)
    raw = {}
    try:
        for s in chosen:
            if s.runner == "accelerate":
                spec = dict(common, model_dir=str(sources[s.weights]), offload_folder=str(workdir / "offload"), dtype=dtype,
                            drop_each_pass=storage == "disk")
            else:
                spec = dict(common, checkpoint=str(ckpts[s.name]), storage=storage)
            raw[s.name] = _run_worker(s.runner, spec, workdir, s.name, bar)
    finally:
        bar.close()

    machine = {"disk_read_GBps": disk["GBps"], "disk_read_direct": disk["direct"], "mem_GBps": mem["GBps"],
               "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}
    machine.update(disk_read_depth=disk["depth"], disk_read_chunk=disk["chunk"], disk_read_sweep=disk["sweep"])
    setup = {"model_dir": str(model_dir), "dense_dir": str(sources["unpruned"]) if sources["unpruned"] else None,
             "synthetic": synthetic, "dense_weight_bytes": dense_bytes, "budget": str(budget), "budget_bytes": budget_bytes,
             "storage": storage, "batch": batch, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
             "warmup": warmup, "reps": reps, "dtype": dtype}
    if synthetic:
        setup.update(arch=arch, params=str(params), sparsity=sparsity, seed=seed)
    results = report.results_json(machine=machine, versions=versions(), setup=setup,
                                  systems=[(asdict(s), raw[s.name]) for s in chosen], storage=storage)
    report.write_all(results, out, plot=plot)
    return results


def select_systems(names) -> tuple[System, ...]:
    """The systems named in `names` (a list, or "a,b,c"), in run order; BenchError for an unknown name."""
    names = _parse_list(names) if isinstance(names, str) else list(names)
    known = {s.name for s in SYSTEMS}
    bad = [n for n in names if n not in known]
    if bad:
        raise BenchError(f"unknown system {', '.join(bad)} (choose from {', '.join(known)})")
    return tuple(s for s in SYSTEMS if s.name in names)


def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def sweep(*, out, sparsities, budgets, storage: str = "disk", arch: str = "llama", params="1B", seed: int = 0,
          vocab: int | None = None, batch: int = 1, prompt_tokens: int = 32, new_tokens: int = 16, warmup: int = 1,
          reps: int = 3, threads: int | None = None, workdir=None, plot: bool = True, progress: bool = True) -> dict:
    """Speedup of sparseferry-bitmap over Accelerate for every (sparsity, budget) pair, in one plot.

    Runs `bench` on synthetic models at each point with the baseline and the bitmap system only; each
    point's full results go to out/sparsity<S>-budget<B>/. Returns and writes out/sweep.json:
    {"points": [{"sparsity", "budget", "speedup_vs_accelerate", "bound_fraction", ...}], ...}.
    """
    from . import report

    sparsities = [float(s) for s in (sparsities if isinstance(sparsities, (list, tuple)) else _parse_list(sparsities))]
    budgets = list(budgets) if isinstance(budgets, (list, tuple)) else _parse_list(budgets)
    out = Path(out)
    workdir = Path(workdir) if workdir else out / "work"
    systems = tuple(s for s in SYSTEMS if s.baseline or s.name == "sparseferry-bitmap")
    points = []
    for sp in sparsities:
        for b in budgets:
            tag = f"sparsity{sp:g}-budget{b.replace('%', 'pct')}"
            res = bench(out=out / tag, budget=b, storage=storage, arch=arch, params=params, sparsity=sp, seed=seed, vocab=vocab,
                        batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens, warmup=warmup, reps=reps,
                        threads=threads, systems=systems, workdir=workdir, plot=plot, progress=progress)
            bm = next(s for s in res["systems"] if s["name"] == "sparseferry-bitmap")
            points.append({"sparsity": sp, "budget": b, "speedup_vs_accelerate": bm["speedup_vs_accelerate"],
                           "bound_fraction": bm["bound_fraction"], "decode_s_per_token": bm["decode_s_per_token"],
                           "accelerate_decode_s_per_token": next(s["decode_s_per_token"] for s in res["systems"] if s["name"] == "accelerate"),
                           "results": str(out / tag / "results.json")})
    doc = {"points": points, "storage": storage, "arch": arch, "params": str(params), "seed": seed}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(doc, indent=1))
    if plot:
        report.try_plot(report.plot_sweep, doc, out / "sweep.png")
    return doc


__all__ = ["SYSTEMS", "System", "BenchError", "bench", "check_feasible", "sweep", "synth_pair", "weight_bytes", "prompt_ids",
           "select_systems"]
