"""The benchmark's outputs: results.json, a Markdown table, a PNG plot of ms/token with the physical bound.

Per system (all decode figures are medians over the repetitions; one "step" decodes one token of
every sequence in the batch, so per-token figures are per-step figures divided by the batch):

    decode_s_per_token      1 / tokens_per_s
    bytes_read_per_token    bytes the kernel fetched from storage per token (/proc/self/io read_bytes of
                            the worker; llama.cpp: its process's read_bytes, see llama_cpp)
    achieved_GBps           bytes read per step / seconds per step
    bits_per_weight         the system's weight bytes (its own format) x 8 / parameters
    touched_bytes_per_step  weight bytes one decode step reads: all but the token-embedding table (one row)
    effective_GBps          touched_bytes_per_step / seconds per step (weight bandwidth)
    bound_s_per_token       lower bound from this run's ceilings and the bytes this system moves per step:
                            the bytes it READ per step (measured; planned where not measured) at the disk
                            ceiling, its resident weights at the memory ceiling, the larger of the two
                            (they overlap); in RAM (storage host) all touched bytes at the memory ceiling
    bound_fraction          bound_s_per_token / decode_s_per_token (1.0 = at the physical limit)
    x_of_bound              decode_s_per_token / bound_s_per_token (1.0 = at the limit; the table's "x of bound")
    speedup_vs_baseline     baseline decode_s_per_token / this system's (the baseline: Accelerate, or in the
                            in-RAM scenario transformers); speedup_vs_accelerate the same where Accelerate is it
    tokens_agree            greedy tokens equal those of the first system run on the same weights
                            (for quantized systems, exact=False, a difference is expected, not an error;
                            llama.cpp rows: not compared, llama-bench decodes token ids it picks itself)
    cgroup                  cgroup scenario: limit (idle + budget + slack), peak charge, OOM-killed
    rounds_decode_s_per_token   with bench(rounds=N): the system's decode time in each round (the figures
                            above are those of its median round)
    same_round_speedup      with rounds: {reference: {"per_round", "median", "min", "max"}}, the reference's
                            decode time / this system's in the same round, for the baseline and llama.cpp-bf16
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .ceilings import bound_s_per_step


def _median_split(reps: list[dict]) -> dict | None:
    splits = [r["runtime"] for r in reps if r.get("runtime")]
    if not splits:
        return None
    return {k: statistics.median(s[k] for s in splits if s.get(k) is not None)
            for k in splits[0] if any(s.get(k) is not None for s in splits)}


def results_json(*, machine: dict, versions: dict, setup: dict, systems: list[tuple[dict, dict]], storage: str) -> dict:
    """Assemble results.json from (system definition, worker result) pairs, in run order."""
    batch = setup["batch"]
    disk_gbps, mem_gbps = machine.get("disk_read_GBps") or 0.0, machine.get("mem_GBps") or 0.0
    rows = []
    for sysdef, r in systems:
        step, per_step = r.get("decode_s_per_step"), r.get("bytes_read_per_step")
        acc = r.get("weights") or {}
        touched = acc["weight_bytes"] - acc["embedding_bytes"] if acc.get("weight_bytes") else None
        disk_b, ram_b = r.get("weights_disk_bytes"), r.get("weights_ram_bytes")
        if storage == "host":  # offloaded weights live in RAM (host tier, or the page cache)
            disk_b, ram_b = 0, touched if touched is not None else (ram_b or 0) + (disk_b or 0)
        else:
            if per_step is not None:  # what the system really read, not what it planned to
                disk_b = per_step
            if ram_b is None:  # no plan of its own (llama.cpp): what it touched and did not read came from RAM
                ram_b = max((touched or 0) - (disk_b or 0), 0)
        bound = bound_s_per_step(disk_b or 0, ram_b or 0, disk_gbps, mem_gbps) / batch
        t = r.get("decode_s_per_token")
        rows.append({
            "name": sysdef["name"], "runner": sysdef["runner"], "weights": sysdef["weights"], "convert": sysdef["convert"],
            "baseline": sysdef["baseline"], "exact": sysdef.get("exact", True),
            "completed": not r.get("failed") and r.get("completed", True) is not False, "error": r.get("error"),
            "decode_s_per_token": t, "decode_s_per_step": step, "prefill_s": r.get("prefill_s"),
            "tokens_per_s": r.get("tokens_per_s"), "bytes_read_per_token": r.get("bytes_read_per_token"),
            "achieved_GBps": per_step / step / 1e9 if step and per_step is not None else None,
            "bits_per_weight": acc["weight_bytes"] * 8 / acc["params"] if acc.get("params") else None,
            "weight_bytes": acc.get("weight_bytes"), "touched_bytes_per_step": touched,
            "effective_GBps": touched / step / 1e9 if step and touched else None,
            "bound_s_per_token": bound, "bound_fraction": bound / t if t else None, "x_of_bound": t / bound if t and bound else None,
            "peak_rss_bytes": r.get("peak_rss_bytes"), "weights_disk_bytes": disk_b, "weights_ram_bytes": ram_b,
            "load_s": r.get("load_s"), "tokens": r.get("tokens"), "tokens_stable": r.get("tokens_stable"),
            "runtime_split": _median_split(r.get("reps") or []),
            "plan": r.get("plan_summary"), "device_map_counts": r.get("device_map_counts"),
            "cgroup": r.get("cgroup"), "command": r.get("command"),
            "reps": r.get("reps"), "rounds_decode_s_per_token": r.get("rounds_decode_s_per_token"),
        })
    base = next((x for x in rows if x["baseline"]), None)
    first_by_weights: dict[str, dict] = {}
    for x in rows:
        b, t = (base or {}).get("decode_s_per_token"), x["decode_s_per_token"]
        x["speedup_vs_baseline"] = b / t if b and t else None
        x["speedup_vs_accelerate"] = x["speedup_vs_baseline"] if base is not None and base["runner"] == "accelerate" else None
        if x["tokens"] is None:  # llama.cpp (llama-bench picks its own tokens), or a run that did not complete
            x["tokens_agree"] = None
            continue
        if not x["exact"]:  # quantized values: compared with the exact system on the same weights, may differ
            ref = first_by_weights.get(x["weights"])
            x["tokens_agree"] = None if ref is None else x["tokens"] == ref["tokens"]
            continue
        ref = first_by_weights.setdefault(x["weights"], x)
        x["tokens_agree"] = None if ref is x else x["tokens"] == ref["tokens"]
        if ref is x and base is not None and base is not x and base["weights"] == x["weights"] and base["tokens"] is not None:
            x["tokens_agree"] = x["tokens"] == base["tokens"]
    refs = [x for x in rows if x is base or x["name"] == ROUND_REFERENCE]
    for x in rows:
        x["same_round_speedup"] = {ref["name"]: r for ref in refs if (r := _same_round(ref, x)) is not None} or None
    return {"machine": machine, "versions": versions, "setup": setup, "systems": rows,
            "baseline": base["name"] if base else None}


ROUND_REFERENCE = "llama.cpp-bf16"  # besides the baseline, the row every other is compared with round by round


def _same_round(ref: dict, x: dict) -> dict | None:
    """ref's decode time / x's, round by round (rounds where both completed), or None without rounds."""
    a, b = ref.get("rounds_decode_s_per_token"), x.get("rounds_decode_s_per_token")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    per = [ta / tb for ta, tb in zip(a, b) if ta and tb]
    if not per:
        return None
    return {"per_round": per, "median": statistics.median(per), "min": min(per), "max": max(per)}


def _f(v, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def _agree(x: dict) -> str:
    if x["tokens"] is None:
        return "-"
    return {None: "ref", True: "yes", False: "NO"}[x["tokens_agree"]]


def ceilings_line(m: dict) -> str:
    """This run's disk read and memory ceilings, in words."""
    if m.get("disk_read_GBps") is None:
        disk = "disk read not measured (in-RAM scenario)"
    else:
        disk = f"disk read {m['disk_read_GBps']:.2f} GB/s (O_DIRECT {'yes' if m['disk_read_direct'] else 'no'}"
        if m.get("disk_read_sweep"):
            sweeps = 2 if m.get("disk_read_after_GBps") is not None else 1
            disk += (f", best of {len(m['disk_read_sweep']) // sweeps} queue depths x request sizes"
                     + (f" swept before ({m['disk_read_before_GBps']:.2f}) and after ({m['disk_read_after_GBps']:.2f}) the systems"
                        if sweeps == 2 else "")
                     + f": {m['disk_read_depth']} in flight, {m['disk_read_chunk'] >> 10} KiB")
            if m.get("disk_read_single_stream_GBps") is not None:
                disk += f"; one request stream {m['disk_read_single_stream_GBps']:.2f} GB/s"
        disk += ")"
    copy = f" (a copy: {m['mem_copy_GBps']:.1f} GB/s, read + write counted)" if m.get("mem_copy_GBps") else ""
    return (f"Ceilings of this run: {disk}, memory read {m['mem_GBps']:.1f} GB/s{copy}; "
            f"{m['cpu_count']} CPUs, load average {m['load_average'][0]:.2f}.")


def _setup_line(s: dict) -> str:
    threads = f", {s['threads']} threads" if s.get("threads") else ""
    return (f"Budget {s['budget']} = {s['budget_bytes'] / 1e9:.3f} GB of {s['dense_weight_bytes'] / 1e9:.3f} GB dense weights, "
            f"storage {s['storage']}, batch {s['batch']}, prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens, "
            f"{s['dtype']}{threads}, median of {s['reps']} repetitions"
            + (f"; {s['rounds']} rounds (every system once a round, in turn), each system's median round shown."
               if s.get("rounds", 1) > 1 else "."))


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def render_table(results: dict) -> str:
    """The Markdown of results.json: setup and ceilings, one table row per system, then the notes.
    The table's columns depend on the scenario (disk, cgroup, ram); it pastes into a README as is."""
    s = results["setup"]
    scenario = s.get("scenario", "disk")
    lines = [f"Scenario {scenario}: {SCENARIO_WORDS[scenario]}", "", _setup_line(s), ceilings_line(results["machine"]), ""]
    base = results.get("baseline")
    base_word = "transformers" if base == "transformers" else "Accelerate"
    rows = []
    for x in results["systems"]:
        sp = _f(x.get("speedup_vs_baseline", x.get("speedup_vs_accelerate")), ".2f")
        sp = sp + "x" if sp != "-" else sp
        if scenario == "cgroup":
            cg = x.get("cgroup") or {}
            rows.append([x["name"], _f(x["decode_s_per_token"], ".1f", 1e3), _f(x["bytes_read_per_token"], ".1f", 1e-6),
                         _f(x["achieved_GBps"], ".2f"), _f(x["bound_s_per_token"], ".1f", 1e3),
                         _f(x.get("x_of_bound"), ".2f") + ("x" if x.get("x_of_bound") else ""), sp,
                         _f(cg.get("limit_bytes"), ".2f", 1e-9), _f(cg.get("peak_bytes"), ".2f", 1e-9),
                         {True: "yes", False: "no", None: "-"}[cg.get("oom_killed")], _agree(x)])
        elif scenario == "ram":
            rows.append([x["name"], _f(x.get("bits_per_weight"), ".1f"), _f(x["decode_s_per_token"], ".1f", 1e3),
                         _f(x.get("effective_GBps"), ".1f"), _f(x["bound_s_per_token"], ".1f", 1e3),
                         _f(x.get("x_of_bound"), ".2f") + ("x" if x.get("x_of_bound") else ""), _f(x["prefill_s"], ".2f"),
                         sp, _f(x["peak_rss_bytes"], ".2f", 1e-9), _agree(x)])
        else:
            rows.append([x["name"], _f(x["decode_s_per_token"], ".1f", 1e3), _f(x["prefill_s"], ".2f"),
                         _f(x["tokens_per_s"], ".2f"), _f(x["bytes_read_per_token"], ".1f", 1e-6), _f(x["achieved_GBps"], ".2f"),
                         sp, _f(x["bound_s_per_token"], ".1f", 1e3), _f(x["bound_fraction"], ".0%", 1.0),
                         _f(x["peak_rss_bytes"], ".2f", 1e-9), _agree(x)])
    if scenario == "cgroup":
        head = ["system", "decode ms/token", "read MB/token", "achieved read GB/s", "bound ms/token", "x of bound",
                f"speedup vs {base_word}", "cgroup limit GB", "peak cgroup GB", "OOM-killed", "tokens agree"]
    elif scenario == "ram":
        head = ["system", "bits/weight", "decode ms/token", "effective GB/s", "bound ms/token", "x of bound", "prefill s",
                f"speedup vs {base_word}", "peak RSS GB", "tokens agree"]
    else:
        head = ["system", "decode ms/token", "prefill s", "tokens/s", "read MB/token", "achieved GB/s",
                f"speedup vs {base_word}", "bound ms/token", "of bound", "peak RSS GB", "tokens agree"]
    lines += _table(head, rows)
    lines += _rounds_table(results)
    lines += _notes(results)
    return "\n".join(lines) + "\n"


def _rounds_table(results: dict) -> list[str]:
    """With rounds: every system's decode time in each round and its same-round speedups (median, range)."""
    n = results["setup"].get("rounds", 1)
    if n < 2:
        return []
    refs = [r["name"] for r in results["systems"]
            if any(r["name"] in (x.get("same_round_speedup") or {}) for x in results["systems"])]
    head = ["system"] + [f"round {i + 1} ms/token" for i in range(n)] + [f"same-round speedup vs {r}" for r in refs]
    rows = []
    for x in results["systems"]:
        times = x.get("rounds_decode_s_per_token") or [None] * n
        sr = x.get("same_round_speedup") or {}
        rows.append([x["name"]] + [_f(t, ".1f", 1e3) for t in times]
                    + [f"{sr[r]['median']:.2f}x ({sr[r]['min']:.2f}-{sr[r]['max']:.2f})" if r in sr else "-" for r in refs])
    mems = results["machine"].get("mem_GBps_rounds")
    words = f" (memory read ceiling before each: {', '.join(f'{m:.1f}' for m in mems)} GB/s)" if mems else ""
    return ["", f"Round by round{words}; a speedup is the reference's time / the system's in the same round, median "
                f"(lowest-highest) over the rounds:", ""] + _table(head, rows)


SCENARIO_WORDS = {
    "disk": "weights beyond the budget read from the disk, page cache emptied before every repetition (and before every "
            "forward pass of Accelerate's); no memory limit.",
    "cgroup": "RAM smaller than the model: every system in a memory cgroup of budget + its own idle footprint + slack, "
              "page cache charged to the cgroup, emptied before every repetition.",
    "ram": "everything resident in RAM (sparseferry with the budget given, host memory, nothing read from the disk).",
}


def _notes(results: dict) -> list[str]:
    s, lines = results["setup"], []
    scenario = s.get("scenario", "disk")
    if scenario == "cgroup":
        cg = next((x["cgroup"] for x in results["systems"] if x.get("cgroup")), None)
        if cg:
            lines.append(f"\nMemory cgroup v{cg['version']} per system: limit = idle footprint + budget "
                         f"{s['budget_bytes'] / 1e9:.3f} GB + slack {s.get('cgroup_slack_bytes', 0) / 1e9:.2f} GB (no swap); "
                         "the idle footprint is the peak of the same program doing everything but loading weights.")
        lines.append("Bound: bytes read per token at the disk ceiling, resident weights at the memory ceiling, the larger; "
                     "x of bound = decode time / bound.")
    if scenario == "ram":
        lines.append("\nbits/weight: the system's weight bytes x 8 / parameters; effective GB/s: weight bytes touched per "
                     "token (all but the token-embedding table) / decode time; bound: those bytes at the memory ceiling.")
    if any(x["runner"] == "llama.cpp" for x in results["systems"]):
        lc = s.get("llama_cpp") or {}
        lines.append("llama.cpp: GGUF files from the same pruned weights (bf16 by convert_hf_to_gguf.py, Q8_0 and Q4_0 by "
                     "llama-quantize), decode ms/token from llama-bench's token-generation test after a context of the "
                     "prompt's length" + ("; streamed: one process per repetition, page cache of the GGUF emptied "
                                          "before each, mmap, no repacking; read MB/token = read_bytes of an N-token run "
                                          "minus a 1-token run, / (N - 1)" if scenario == "cgroup" else
                                          "; one process, llama-bench's own warm-up, its defaults") + ". "
                     + (f"Tools: {Path(lc['bench']).parent}." if lc.get("bench") else ""))
        cmd = next((x["command"] for x in results["systems"] if x.get("command")), None)
        if cmd:
            lines.append(f"e.g. `{cmd}`")
    for x in results["systems"]:
        if x.get("completed") is False:
            cg = x.get("cgroup") or {}
            lines.append(f"\n{x['name']}: did not complete" + (" (OOM-killed)" if cg.get("oom_killed") else "")
                         + (f": {x['error']}" if x.get("error") else ""))
        sp = x.get("runtime_split")
        if sp:
            lines.append(f"\n{x['name']}: I/O wait {sp.get('io_wait_s', 0):.2f} s, decompress {sp.get('decompress_s', 0):.2f} s, "
                         f"compute {sp.get('compute_s', 0):.2f} s per repetition; {x['plan']}")
            reads = read_path_line(x)
            if reads:
                lines.append(reads)
            if sp.get("experts_needed_bytes_per_token"):
                lines.append(experts_line(x))
        elif x.get("device_map_counts"):
            lines.append(f"\n{x['name']}: device map {x['device_map_counts']} modules; weights in RAM "
                         f"{x['weights_ram_bytes'] / 1e9:.3f} GB, offloaded {x['weights_disk_bytes'] / 1e9:.3f} GB")
    return lines


def read_path_line(x: dict) -> str | None:
    """The runtime's read-path figures (achieved read bandwidth in decode, read and compute time per token,
    their overlap), where its summary has them; decode time against max(read, compute)."""
    sp = x.get("runtime_split") or {}
    keys = ("read_gbps", "read_s_per_token", "compute_s_per_token", "overlap")
    if not any(sp.get(k) is not None for k in keys):
        return None
    parts = []
    if sp.get("read_gbps") is not None:
        parts.append(f"reads {sp['read_gbps']:.2f} GB/s in decode")
    if sp.get("read_s_per_token") is not None:
        parts.append(f"read {sp['read_s_per_token'] * 1e3:.1f} ms/token")
    if sp.get("compute_s_per_token") is not None:
        parts.append(f"compute {sp['compute_s_per_token'] * 1e3:.1f} ms/token")
    if sp.get("overlap") is not None:
        parts.append(f"overlap {sp['overlap']:.2f}")
    worst = max((sp.get("read_s_per_token") or 0), (sp.get("compute_s_per_token") or 0))
    if worst and x.get("decode_s_per_token"):
        parts.append(f"decode = {x['decode_s_per_token'] / worst:.2f}x max(read, compute)")
    return f"{x['name']} read path: " + ", ".join(parts)


def experts_line(x: dict) -> str:
    """MoE: what routing needed per decode token against what was read, and how the expert cache did."""
    sp = x["runtime_split"]
    need = sp["experts_needed_bytes_per_token"]
    read = x.get("bytes_read_per_token")
    ratio = f"{read / need:.2f}x" if read is not None and need else "-"
    hit = sp.get("experts_hit_rate")
    return (f"{x['name']} experts: {_f(sp.get('experts_chosen_per_token'), '.0f')} chosen per token of "
            f"{sp.get('experts_experts_total')}, cache {sp.get('experts_cache_slots')} slots, hit rate "
            f"{_f(hit, '.0%')}; read-ahead {_f(sp.get('experts_predicted_reads'), '.0f')} predicted, "
            f"{_f(sp.get('experts_missed_reads'), '.0f')} missed, {_f(sp.get('experts_wasted_reads'), '.0f')} wasted reads "
            f"per repetition; routing needs {need / 1e6:.1f} MB/token (chosen experts "
            f"{_f(sp.get('experts_routed_expert_bytes_per_token'), '.1f', 1e-6)} MB + streamed bases), read "
            f"{_f(read, '.1f', 1e-6)} MB/token = {ratio} of that")


def plot_results(results: dict, path) -> None:
    """Bar chart of decode ms/token per system, each bar with its physical bound marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [x for x in results["systems"] if x["decode_s_per_token"]]
    names = [x["name"] for x in rows]
    ms = [x["decode_s_per_token"] * 1e3 for x in rows]
    bound = [x["bound_s_per_token"] * 1e3 for x in rows]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 4.2))
    ax.tick_params(axis="x", labelsize=7, labelrotation=20)
    bars = ax.bar(names, ms, color=["#999999" if x["baseline"] else "#2a7ab0" for x in rows])
    for i, (b, bm) in enumerate(zip(bars, bound)):
        ax.hlines(bm, b.get_x(), b.get_x() + b.get_width(), colors="#c0392b", linewidth=2.5,
                  label="physical bound" if i == 0 else None)
        sp = rows[i].get("speedup_vs_baseline", rows[i].get("speedup_vs_accelerate"))
        ax.annotate(f"{ms[i]:.0f} ms" + (f"\n{sp:.2f}x" if sp and not rows[i]["baseline"] else ""),
                    (b.get_x() + b.get_width() / 2, ms[i]), ha="center", va="bottom", fontsize=8)
    s = results["setup"]
    ax.set_ylabel("decode ms / token (lower is better)")
    disk = results["machine"].get("disk_read_GBps")
    ax.set_title(f"scenario {s.get('scenario', 'disk')}, budget {s['budget']}, storage {s['storage']}, batch {s['batch']}; "
                 + (f"disk {disk:.2f} GB/s, " if disk else "") + f"memory {results['machine']['mem_GBps']:.1f} GB/s", fontsize=9)
    ax.set_ylim(0, max(ms + bound) * 1.25)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(doc: dict, path) -> None:
    """Speedup over Accelerate against sparsity, one line per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for b in dict.fromkeys(p["budget"] for p in doc["points"]):
        pts = sorted((p["sparsity"], p["speedup_vs_accelerate"]) for p in doc["points"] if p["budget"] == b and p["speedup_vs_accelerate"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"budget {b}")
    ax.axhline(1.0, color="#999999", linewidth=1)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("speedup vs Accelerate (decode tokens/s)")
    ax.set_title(f"sparseferry-bitmap, storage {doc['storage']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict, out, *, plot: bool = True) -> dict:
    """Write results.json, results.md and (if `plot`) results.png into `out`; returns their paths."""
    out = Path(out)
    paths = {"json": out / "results.json", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["md"].write_text(render_table(results))
    if plot and try_plot(plot_results, results, out / "results.png"):
        paths["png"] = out / "results.png"
    return paths


def can_plot() -> bool:
    """matplotlib (the `plot` extra) is importable."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def try_plot(fn, data, path) -> bool:
    """Draw a plot if matplotlib is there; never fails (the measurements are already written). True if drawn."""
    import sys

    if not can_plot():
        print(f"note: {path} not drawn: matplotlib is not installed (pip install 'sparseferry[plot]')", file=sys.stderr)
        return False
    try:
        fn(data, path)
    except Exception as e:  # noqa: BLE001 - a plotting failure must not lose the results
        print(f"note: {path} not drawn: {type(e).__name__}: {e}", file=sys.stderr)
        return False
    return True
