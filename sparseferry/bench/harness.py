"""`sparseferry bench`: every system on the same weights, prompt, lengths, batch, dtype and budget, back to back.

    prepare   the models: a synthetic pruned folder (or the user's), its unpruned twin (same shape and
              seed: the dense bytes Accelerate reads), the sparseferry checkpoints converted from them,
              and with --llama-cpp the GGUF files written from the same pruned folder (see llama_cpp);
    ceilings  disk read (best of several queue depths and request sizes) and memory bandwidth, now;
    systems   each in its own subprocess (clean RSS, fair peak memory), warmed up, then `reps` repetitions;
              with `rounds` > 1 the whole list again, round after round (see `bench`);
    report    the table, results.json and the plot (see `report`).

Three scenarios (`scenario`):
    disk      (default) the weights beyond the budget come from the disk: the page cache is emptied
              before every repetition, and Accelerate's before every forward pass (its offloaded
              weights are read through the page cache; sparseferry's with O_DIRECT). No memory limit.
    cgroup    RAM smaller than the model: every system (Accelerate, sparseferry, llama.cpp) runs in a
              memory cgroup of budget + its own idle footprint + `cgroup_slack`, page cache charged
              to the cgroup, so nothing can be served from RAM beyond that; the page cache is emptied
              before every repetition only (the limit does the rest). The idle footprint is the peak of
              the same worker doing everything but loading weights (imports, tokenizer or model
              skeleton; for llama.cpp, `llama-bench --help`), measured in its own cgroup just before.
              Each row reports the limit, the peak charge and whether it was OOM-killed.
    ram       everything resident: transformers dense bf16 without offloading (the baseline), sparseferry
              with a budget of 100% (host memory, nothing streamed), llama.cpp from its memory map.

The budget is a share of the DENSE model's bytes (what Accelerate users mean by "30%"), passed as the
same number of bytes to every system.
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
    runner: str  # "accelerate" | "sparseferry" | "transformers" (dense, everything in RAM) | "llama.cpp"
    weights: str  # "pruned" (the model benchmarked) | "unpruned" (its dense twin, same shape and seed)
    convert: dict = field(default_factory=dict)  # sparseferry: keyword arguments of convert; llama.cpp: {"gguf": kind}
    baseline: bool = False  # the one speedups are relative to
    exact: bool = True  # stores the weights losslessly (False: quantized values, tokens may differ)


# The systems, in run order. A new value encoding is one more line here (its convert option).
SYSTEMS = (
    System("accelerate", "accelerate", "pruned", baseline=True),
    System("sparseferry-dense", "sparseferry", "unpruned"),
    System("sparseferry-bitmap", "sparseferry", "pruned"),
    # The quantized rows quantize the output head too, as llama.cpp's Q8_0 / Q4_0 files do.
    System("sparseferry-bitmap-int8", "sparseferry", "pruned", convert={"values": "int8", "encode_lm_head": True},
           exact=False),
    System("sparseferry-bitmap-int4", "sparseferry", "pruned", convert={"values": "int4", "encode_lm_head": True},
           exact=False),
)
# Beyond the disk scenario's systems: the in-RAM baseline and llama.cpp's three encodings of the same weights.
TRANSFORMERS = System("transformers", "transformers", "pruned", baseline=True)
LLAMA_CPP_SYSTEMS = tuple(System(f"llama.cpp-{k}", "llama.cpp", "pruned", convert={"gguf": k}, exact=k == "bf16")
                          for k in ("bf16", "q8_0", "q4_0"))
CATALOGUE = (TRANSFORMERS,) + SYSTEMS + LLAMA_CPP_SYSTEMS  # every system, in run order
SCENARIOS = ("disk", "cgroup", "ram")
CGROUP_SLACK = 300_000_000  # bytes added to every cgroup limit (KV cache, activations, read buffers): 0.3 GB
RUNNERS = {"accelerate": "sparseferry.bench.accelerate_baseline", "transformers": "sparseferry.bench.accelerate_baseline",
           "sparseferry": "sparseferry.bench.sparseferry_runner"}
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
    from ..quant import QUANT_FORMATS, default_group_size

    if options.get("values") in QUANT_FORMATS and options.get("group_size") is None:  # named, so a new default
        options = {**options, "group_size": default_group_size(options["values"])}  # is a new conversion
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


def _run_worker(runner: str, spec: dict, workdir: Path, label: str, bar=None, cgroup=None) -> dict:
    """Run one system's worker subprocess (inside `cgroup`, a prepared MemoryCgroup, if given); its JSON
    events move `bar`; returns its result. A failure raises BenchError, except inside a cgroup: then the
    result is {"failed": True, "returncode", "error"} and the caller decides (an OOM kill is a result)."""
    fd, spec_path = tempfile.mkstemp(prefix="spec-", suffix=".json", dir=workdir)
    os.close(fd)
    res_path = Path(spec_path).with_name(Path(spec_path).name.replace("spec-", "result-"))
    Path(spec_path).write_text(json.dumps(spec))
    log = Path(workdir) / f"{label}.log"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", RUNNERS[runner], spec_path, str(res_path)]
    if cgroup is not None:
        cmd = cgroup.wrap(cmd)
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
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
        lines = log.read_text().splitlines(keepends=True)
        if cgroup is not None:
            return {"failed": True, "returncode": rc, "error": lines[-1].strip() if lines else f"exit {rc}"}
        raise BenchError(f"{label} failed (exit {rc}); last lines of {log}:\n{''.join(lines[-15:])}")
    result = json.loads(res_path.read_text())
    res_path.unlink()
    return result


def systems_for(scenario: str, llama_cpp: bool = False) -> tuple[System, ...]:
    """The default systems of a scenario (llama.cpp's rows only where a build is given)."""
    if scenario not in SCENARIOS:
        raise BenchError(f"scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
    llama = LLAMA_CPP_SYSTEMS if llama_cpp else ()
    if scenario == "disk":
        return SYSTEMS
    if scenario == "cgroup":
        return SYSTEMS + llama
    return (TRANSFORMERS,) + tuple(s for s in SYSTEMS if s.runner == "sparseferry" and s.weights == "pruned") + llama


def _tensor_sizes_hf(folder: Path) -> dict[str, tuple[int, int]]:
    """{name: (bytes, elements)} of a HuggingFace folder's safetensors tensors, from their headers."""
    from safetensors import safe_open

    sizes = {}
    item = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "BOOL": 1}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                sizes[k] = (n * item.get(sl.get_dtype(), 2), n)
    return sizes


def weight_accounting(system: System, folder: Path, ckpt: Path | None = None, gguf_sizes=None) -> dict | None:
    """The weights a system holds, in its own format: {"weight_bytes", "params", "embedding_bytes"}.

    The token-embedding table is read one row per token, so "bytes touched per decode step" is
    weight_bytes - embedding_bytes (0 when the output head is the same tensor: it is read whole).
    None for mixtures of experts (a token touches only its experts) or where the sizes are unknown.
    """
    from .llama_cpp import weight_accounting as gguf_accounting

    cfg = json.loads((folder / "config.json").read_text())
    if any(cfg.get(k) for k in ("num_local_experts", "num_experts")):
        return None
    hf = _tensor_sizes_hf(folder)
    if not hf:
        return None
    params = sum(n for _, n in hf.values())
    if gguf_sizes is not None:
        return gguf_accounting(gguf_sizes) | {"params": params}
    if ckpt is not None:
        from ..store import open_checkpoint

        ck = open_checkpoint(ckpt)
        sizes = {n: (e.stored_bytes, 0) for n, e in ck.tensors.items()}
    else:
        sizes = hf
    emb = next((b for n, (b, _) in sizes.items() if n.endswith("embed_tokens.weight")), 0)
    tied = not any(n.endswith("lm_head.weight") for n in sizes)
    return {"weight_bytes": sum(b for b, _ in sizes.values()), "params": params, "embedding_bytes": 0 if tied else emb}


def _idle_footprint(run_idle, label: str) -> int:
    """Peak cgroup charge of `run_idle(cgroup)` (the system doing everything but loading weights), unlimited."""
    from .cgroup import MemoryCgroup

    cg = MemoryCgroup.create(f"sparseferry-bench-idle-{label}")
    if cg is None:
        raise BenchError(f"no memory cgroup: {MemoryCgroup.unavailable}")
    with cg:
        cg.prepare(None)
        run_idle(cg)
        return cg.outcome()[0]


def _in_cgroup(label: str, limit: int, run) -> tuple[dict, dict]:
    """`run(cgroup)` inside a fresh cgroup limited to `limit` bytes; (its result, the cgroup's record)."""
    from .cgroup import MemoryCgroup

    cg = MemoryCgroup.create(f"sparseferry-bench-{label}")
    if cg is None:
        raise BenchError(f"no memory cgroup: {MemoryCgroup.unavailable}")
    with cg:
        cg.prepare(limit)
        res = run(cg)
        peak, oom = cg.outcome()
    return res, {"version": cg.version, "limit_bytes": limit, "peak_bytes": peak, "oom_killed": oom}


def bench(model_dir=None, *, out, budget=None, storage: str | None = None, scenario: str = "disk", arch: str = "llama",
          params="1B", sparsity: float = 0.5, seed: int = 0, vocab: int | None = None, dense_dir=None, batch: int = 1,
          prompt_tokens: int = 32, new_tokens: int = 16, warmup: int = 1, reps: int = 3, threads: int | None = None,
          systems=None, llama_cpp=None, llama_cpp_src=None, cgroup_slack: int = CGROUP_SLACK, workdir=None,
          rounds: int = 1, plot: bool = True, progress: bool = True) -> dict:
    """Benchmark every system of `systems` and write results.json, results.md (and results.png) into `out`.

    Args:
        model_dir: a HuggingFace folder of a pruned model stored densely (as Accelerate users have it);
            None: a synthetic model (`arch`, `params`, `sparsity`, `seed`, `vocab`; see sparseferry.synth).
        dense_dir: the unpruned twin of `model_dir` for the "unpruned" systems (synthetic: made with it;
            user model without one: those systems are skipped).
        scenario: "disk" (default), "cgroup" or "ram" (see the module docstring).
        budget: share ("30%") of the dense weight bytes, or a size ("2GiB"); the same bytes for all systems
            (default: 30%; 100% in the ram scenario).
        storage: "disk" (page cache emptied, reads from the disk) or "host" (streamed weights in RAM:
            sparseferry's host tier; Accelerate with its offloaded weights left in the page cache).
            Default and only choice per scenario: disk for cgroup, host for ram.
        batch / prompt_tokens / new_tokens: greedy decoding of `batch` prompts of `prompt_tokens` tokens.
        warmup / reps: untimed runs, then timed repetitions (medians reported).
        threads: threads in every system (torch's, llama-bench -t; default: torch's default).
        systems: the systems to run (default: `systems_for(scenario, llama_cpp given)`).
        llama_cpp / llama_cpp_src: a llama.cpp build folder (or its bin/) and its source tree (default:
            found near the build); needed by the llama.cpp systems, which run in the cgroup and ram scenarios.
        cgroup_slack: bytes added to every system's cgroup limit (default 0.3 GB).
        workdir: where models, checkpoints and logs go (default: out/work).
    Returns:
        the results dict written to results.json (see report.results_json).
    Raises:
        BenchError, LlamaCppError, SynthError, ConvertError with the folder or system at fault.
    """
    from tqdm import tqdm

    from . import ceilings, report
    from .measure import versions

    if scenario not in SCENARIOS:
        raise BenchError(f"scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
    forced = {"cgroup": "disk", "ram": "host"}.get(scenario)
    if storage is not None and forced is not None and storage != forced:
        raise BenchError(f"scenario {scenario} streams from {forced}: drop --storage {storage}")
    storage = storage or forced or "disk"
    if storage not in ("disk", "host"):
        raise BenchError(f"storage {storage!r}: expected 'disk' or 'host'")
    budget = budget if budget is not None else ("100%" if scenario == "ram" else "30%")
    if reps < 1 or warmup < 0 or batch < 1 or new_tokens < 2 or prompt_tokens < 1 or rounds < 1:
        raise BenchError(f"need reps >= 1, warmup >= 0, batch >= 1, new_tokens >= 2, prompt_tokens >= 1, rounds >= 1 "
                         f"(got {reps}, {warmup}, {batch}, {new_tokens}, {prompt_tokens}, {rounds})")
    systems = tuple(systems) if systems is not None else systems_for(scenario, llama_cpp is not None)
    wants_llama = [s.name for s in systems if s.runner == "llama.cpp"]
    if wants_llama and llama_cpp is None:
        raise BenchError(f"{', '.join(wants_llama)} need a llama.cpp build: pass --llama-cpp DIR "
                         "(benchmarks/build_llama_cpp.sh makes one)")
    if wants_llama and scenario == "disk":
        raise BenchError("llama.cpp runs in --scenario cgroup (RAM smaller than the model) or ram: without a memory "
                         "limit its memory-mapped weights stay in the page cache after the first token")
    if wants_llama and batch != 1:
        raise BenchError(f"llama.cpp rows are measured at batch 1 (llama-bench decodes one sequence), not {batch}")
    if scenario == "cgroup":
        from .cgroup import MemoryCgroup

        probe = MemoryCgroup.create("sparseferry-bench-probe")
        if probe is None:
            raise BenchError(f"--scenario cgroup needs a writable memory cgroup (root, cgroup v2 or v1 memory "
                             f"controller): {MemoryCgroup.unavailable}")
        probe.remove()
    tools = None
    if wants_llama:
        from .llama_cpp import LlamaCpp

        tools = LlamaCpp(llama_cpp, llama_cpp_src)  # every tool found before the first (long) step
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
    threads_used = threads or __import__("torch").get_num_threads()

    ckpts, ggufs = {}, {}
    for s in chosen:
        if s.runner == "sparseferry":
            ckpts[s.name] = converted(sources[s.weights], workdir, s.convert, progress)
    if tools is not None:
        from .llama_cpp import gguf_files

        kinds = tuple(s.convert["gguf"] for s in chosen if s.runner == "llama.cpp")
        ggufs = gguf_files(tools, model_dir, workdir / f"{model_dir.name}-gguf", kinds=("bf16",) + kinds)

    check_feasible(chosen, ckpts, budget_bytes, storage)  # every system, before the first (long) run
    mem = ceilings.memory_gbps()
    disk = None if scenario == "ram" else ceilings.disk_read_gbps([model_dir], max_bytes=min(dense_bytes, 2 << 30))

    common = dict(prompt_ids=ids, new_tokens=new_tokens, warmup=warmup, reps=reps, pad_token_id=pad, threads=threads,
                  budget_bytes=budget_bytes)
    per_system = {s.name: warmup + reps if s.runner != "llama.cpp" else (reps if scenario == "cgroup" else 1) for s in chosen}
    bar = tqdm(total=sum(per_system.values()) * rounds, unit="run", desc="bench",
               disable=not progress)
    per_round: dict[str, list[dict]] = {s.name: [] for s in chosen}
    mems = [mem]
    try:
        for rnd in range(rounds):
            if rnd:
                mems.append(ceilings.memory_gbps())
            for s in chosen:
                r = _run_system(s, scenario=scenario, storage=storage, common=common, sources=sources, ckpts=ckpts,
                                ggufs=ggufs, tools=tools, workdir=workdir, dtype=dtype, threads=threads_used,
                                prompt_tokens=prompt_tokens, new_tokens=new_tokens, reps=reps,
                                budget_bytes=budget_bytes, slack=cgroup_slack, bar=bar)
                per_round[s.name].append(r)
    finally:
        bar.close()
    raw = {name: median_round(rs) for name, rs in per_round.items()}
    for s in chosen:  # the weights are the same in every round: counted once
        gguf_sizes = None
        if tools is not None and s.runner == "llama.cpp":
            from .llama_cpp import gguf_tensor_bytes

            gguf_sizes = gguf_tensor_bytes(tools, ggufs[s.convert["gguf"]])
        raw[s.name]["weights"] = weight_accounting(s, sources[s.weights], ckpts.get(s.name), gguf_sizes)
    mem = dict(max(mems, key=lambda m: m["GBps"]))  # the ceiling: the best the memory gave in this run
    if disk is not None:  # the disk drifts: the sweep again after the systems, the better of the two is the ceiling
        after = ceilings.disk_read_gbps([model_dir], max_bytes=min(dense_bytes, 2 << 30))
        before = disk
        disk = dict(max((before, after), key=lambda d: d["GBps"]))
        disk["before_GBps"], disk["after_GBps"] = before["GBps"], after["GBps"]
        disk["sweep"] = before["sweep"] + after["sweep"]

    machine = {"disk_read_GBps": disk["GBps"] if disk else None, "disk_read_direct": disk["direct"] if disk else None,
               "mem_GBps": mem["GBps"], "mem_copy_GBps": mem.get("copy_GBps"), "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}
    if rounds > 1:
        machine["mem_GBps_rounds"] = [m["GBps"] for m in mems]
    if disk:
        single = max((e["GBps"] for e in disk["sweep"] if e["depth"] == 1), default=None)
        machine.update(disk_read_depth=disk["depth"], disk_read_chunk=disk["chunk"], disk_read_sweep=disk["sweep"],
                       disk_read_single_stream_GBps=single, disk_read_before_GBps=disk["before_GBps"],
                       disk_read_after_GBps=disk["after_GBps"])
    setup = {"model_dir": str(model_dir), "dense_dir": str(sources["unpruned"]) if sources["unpruned"] else None,
             "synthetic": synthetic, "dense_weight_bytes": dense_bytes, "budget": str(budget), "budget_bytes": budget_bytes,
             "storage": storage, "scenario": scenario, "batch": batch, "prompt_tokens": prompt_tokens,
             "new_tokens": new_tokens, "warmup": warmup, "reps": reps, "rounds": rounds, "dtype": dtype,
             "threads": threads_used}
    if scenario == "cgroup":
        setup["cgroup_slack_bytes"] = cgroup_slack
    if tools is not None:
        setup["llama_cpp"] = {"bench": str(tools.bench), "quantize": str(tools.quantize), "converter": str(tools.converter),
                              "gguf": {k: str(v) for k, v in ggufs.items()}}
    if synthetic:
        setup.update(arch=arch, params=str(params), sparsity=sparsity, seed=seed)
    results = report.results_json(machine=machine, versions=versions(), setup=setup,
                                  systems=[(asdict(s), raw[s.name]) for s in chosen], storage=storage)
    report.write_all(results, out, plot=plot)
    return results


def median_round(results: list[dict]) -> dict:
    """A system's result over the rounds: the round of its median decode time (the lower middle one of an
    even count; rounds that did not complete count only where none did), with every round's decode time
    in `rounds_decode_s_per_token` (None for a round that did not complete), in run order."""
    times = [None if r.get("failed") or r.get("completed") is False else r.get("decode_s_per_token") for r in results]
    done = sorted((t, i) for i, t in enumerate(times) if t is not None)
    pick = results[done[(len(done) - 1) // 2][1]] if done else results[0]
    return dict(pick, rounds_decode_s_per_token=times)


def _run_system(s: System, *, scenario, storage, common, sources, ckpts, ggufs, tools, workdir, dtype, threads,
                prompt_tokens, new_tokens, reps, budget_bytes, slack, bar) -> dict:
    """One system's result in its scenario (inside its cgroup in the cgroup scenario)."""
    if s.runner == "llama.cpp":
        from .llama_cpp import bench_runs

        gguf = ggufs[s.convert["gguf"]]

        def on_rep(i, of):
            if i:
                bar.set_postfix_str(f"{s.name}: rep {i}/{of}")
                bar.update(1)
            else:
                bar.set_postfix_str(f"{s.name}: 1-token run")

        def run(cg=None):
            return bench_runs(tools, gguf, threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens, reps=reps,
                              streamed=scenario == "cgroup", cgroup=cg, on_rep=on_rep)

        def idle(cg):
            from .llama_cpp import run_counted

            run_counted([str(tools.bench), "--help"], cgroup=cg)
    else:
        if s.runner == "sparseferry":
            spec = dict(common, checkpoint=str(ckpts[s.name]), storage=storage)
        else:
            spec = dict(common, model_dir=str(sources[s.weights]), offload_folder=str(workdir / "offload"), dtype=dtype,
                        resident=s.runner == "transformers",
                        # disk: emptied before every pass; cgroup: before every repetition (the limit does the
                        # rest); ram / host: never
                        drop_each_pass=scenario == "disk" and storage == "disk",
                        drop_each_rep=storage == "disk")

        def run(cg=None):
            return _run_worker(s.runner, spec, workdir, s.name, bar, cgroup=cg)

        def idle(cg):
            r = _run_worker(s.runner, dict(spec, idle=True), workdir, f"{s.name}-idle", None, cgroup=cg)
            if r.get("failed"):
                raise BenchError(f"{s.name}: the idle-footprint run failed: {r['error']}")

    if scenario != "cgroup":
        return run()
    idle_bytes = _idle_footprint(idle, s.name)
    limit = idle_bytes + budget_bytes + slack
    res, cg = _in_cgroup(s.name, limit, run)
    cg.update(idle_bytes=idle_bytes, budget_bytes=budget_bytes, slack_bytes=slack)
    if res.get("failed") or res.get("completed") is False:
        if not cg["oom_killed"] and s.runner != "llama.cpp":
            raise BenchError(f"{s.name} failed in its cgroup (exit {res.get('returncode')}, not OOM-killed): {res.get('error')}; "
                             f"see {workdir / (s.name + '.log')}")
        res = {"failed": True, "error": res.get("error"), "completed": False} | {
            k: v for k, v in res.items() if k not in ("failed", "error", "completed")}
    res["cgroup"] = cg
    return res


def select_systems(names) -> tuple[System, ...]:
    """The systems named in `names` (a list, or "a,b,c"), in run order; BenchError for an unknown name."""
    names = _parse_list(names) if isinstance(names, str) else list(names)
    known = [s.name for s in CATALOGUE]
    bad = [n for n in names if n not in known]
    if bad:
        raise BenchError(f"unknown system {', '.join(bad)} (choose from {', '.join(known)})")
    return tuple(s for s in CATALOGUE if s.name in names)


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


__all__ = ["SYSTEMS", "CATALOGUE", "LLAMA_CPP_SYSTEMS", "SCENARIOS", "TRANSFORMERS", "System", "BenchError", "bench",
           "check_feasible", "sweep", "synth_pair", "weight_bytes", "prompt_ids", "systems_for", "weight_accounting",
           "select_systems", "median_round"]
