"""The benchmark's outputs: results.json, a Markdown table, a PNG plot of ms/token with the physical bound.

Per system (all decode figures are medians over the repetitions; one "step" decodes one token of
every sequence in the batch, so per-token figures are per-step figures divided by the batch):

    decode_s_per_token      1 / tokens_per_s
    bytes_read_per_token    bytes the kernel fetched from storage per token (/proc/self/io)
    achieved_GBps           bytes read per step / seconds per step
    bound_s_per_token       lower bound from this machine's ceilings and the bytes this system must move
                            per step (its offloaded weights from disk, its resident weights from RAM)
    bound_fraction          bound_s_per_token / decode_s_per_token (1.0 = at the physical limit)
    speedup_vs_accelerate   baseline decode_s_per_token / this system's
    tokens_agree            greedy tokens equal those of the first system run on the same weights
                            (for quantized systems, exact=False, a difference is expected, not an error)
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
    rows = []
    for sysdef, r in systems:
        disk_b, ram_b = r.get("weights_disk_bytes", 0), r.get("weights_ram_bytes", 0)
        if storage == "host":  # offloaded weights live in RAM (host tier, or the page cache)
            disk_b, ram_b = 0, ram_b + disk_b
        bound = bound_s_per_step(disk_b, ram_b, machine["disk_read_GBps"], machine["mem_GBps"]) / batch
        step, per_step = r.get("decode_s_per_step"), r.get("bytes_read_per_step")
        rows.append({
            "name": sysdef["name"], "runner": sysdef["runner"], "weights": sysdef["weights"], "convert": sysdef["convert"],
            "baseline": sysdef["baseline"], "exact": sysdef.get("exact", True),
            "decode_s_per_token": r.get("decode_s_per_token"), "decode_s_per_step": step, "prefill_s": r.get("prefill_s"),
            "tokens_per_s": r.get("tokens_per_s"), "bytes_read_per_token": r.get("bytes_read_per_token"),
            "achieved_GBps": per_step / step / 1e9 if step and per_step is not None else None,
            "bound_s_per_token": bound, "bound_fraction": bound / r["decode_s_per_token"] if r.get("decode_s_per_token") else None,
            "peak_rss_bytes": r.get("peak_rss_bytes"), "weights_disk_bytes": disk_b, "weights_ram_bytes": ram_b,
            "load_s": r.get("load_s"), "tokens": r.get("tokens"), "tokens_stable": r.get("tokens_stable"),
            "runtime_split": _median_split(r.get("reps", [])),
            "plan": r.get("plan_summary"), "device_map_counts": r.get("device_map_counts"),
            "reps": r.get("reps"),
        })
    base = next((x for x in rows if x["baseline"]), None)
    first_by_weights: dict[str, dict] = {}
    for x in rows:
        if not x["exact"]:  # quantized values: compared with the exact system on the same weights, may differ
            ref = first_by_weights.get(x["weights"])
            x["tokens_agree"] = None if ref is None else x["tokens"] == ref["tokens"]
            b, t = (base or {}).get("decode_s_per_token"), x["decode_s_per_token"]
            x["speedup_vs_accelerate"] = b / t if b and t else None
            continue
        ref = first_by_weights.setdefault(x["weights"], x)
        x["tokens_agree"] = None if ref is x else x["tokens"] == ref["tokens"]
        if ref is x and base is not None and base is not x and base["weights"] == x["weights"]:
            x["tokens_agree"] = x["tokens"] == base["tokens"]
        b, t = (base or {}).get("decode_s_per_token"), x["decode_s_per_token"]
        x["speedup_vs_accelerate"] = b / t if b and t else None
    return {"machine": machine, "versions": versions, "setup": setup, "systems": rows}


def _f(v, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def render_table(results: dict) -> str:
    """The Markdown table of results.json (one row per system)."""
    m, s = results["machine"], results["setup"]
    head = ("| system | decode ms/token | prefill s | tokens/s | read MB/token | achieved GB/s | speedup vs Accelerate "
            "| bound ms/token | of bound | peak RSS GB | tokens agree |")
    lines = [
        f"Budget {s['budget']} = {s['budget_bytes'] / 1e9:.3f} GB of {s['dense_weight_bytes'] / 1e9:.3f} GB dense weights, "
        f"storage {s['storage']}, batch {s['batch']}, prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens, "
        f"{s['dtype']}, median of {s['reps']} repetitions.",
        f"Machine: disk read {m['disk_read_GBps']:.2f} GB/s (O_DIRECT {'yes' if m['disk_read_direct'] else 'no'}"
        + (f", best of {len(m['disk_read_sweep'])} queue depths x request sizes: {m['disk_read_depth']} in flight,"
           f" {m['disk_read_chunk'] >> 10} KiB" if m.get("disk_read_sweep") else "") + "), "
        f"memory {m['mem_GBps']:.1f} GB/s, {m['cpu_count']} CPUs, load average {m['load_average'][0]:.2f}.",
        "",
        head,
        "|" + "---|" * head.count(" | ") + "---|",
    ]
    for x in results["systems"]:
        agree = {None: "ref", True: "yes", False: "NO"}[x["tokens_agree"]]
        lines.append(" | ".join([
            f"| {x['name']}", _f(x["decode_s_per_token"], ".1f", 1e3), _f(x["prefill_s"], ".2f"), _f(x["tokens_per_s"], ".2f"),
            _f(x["bytes_read_per_token"], ".1f", 1e-6), _f(x["achieved_GBps"], ".2f"), _f(x["speedup_vs_accelerate"], ".2f") + "x",
            _f(x["bound_s_per_token"], ".1f", 1e3), _f(x["bound_fraction"], ".0%", 1.0), _f(x["peak_rss_bytes"], ".2f", 1e-9),
            agree]) + " |")
    for x in results["systems"]:
        sp = x.get("runtime_split")
        if sp:
            lines.append(f"\n{x['name']}: I/O wait {sp.get('io_wait_s', 0):.2f} s, decompress {sp.get('decompress_s', 0):.2f} s, "
                         f"compute {sp.get('compute_s', 0):.2f} s per repetition; {x['plan']}")
            if sp.get("experts_needed_bytes_per_token"):
                lines.append(experts_line(x))
        elif x.get("device_map_counts"):
            lines.append(f"\n{x['name']}: device map {x['device_map_counts']} modules; weights in RAM "
                         f"{x['weights_ram_bytes'] / 1e9:.3f} GB, offloaded {x['weights_disk_bytes'] / 1e9:.3f} GB")
    return "\n".join(lines) + "\n"


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
    bars = ax.bar(names, ms, color=["#999999" if x["baseline"] else "#2a7ab0" for x in rows])
    for i, (b, bm) in enumerate(zip(bars, bound)):
        ax.hlines(bm, b.get_x(), b.get_x() + b.get_width(), colors="#c0392b", linewidth=2.5,
                  label="physical bound" if i == 0 else None)
        sp = rows[i]["speedup_vs_accelerate"]
        ax.annotate(f"{ms[i]:.0f} ms" + (f"\n{sp:.2f}x" if sp and not rows[i]["baseline"] else ""),
                    (b.get_x() + b.get_width() / 2, ms[i]), ha="center", va="bottom", fontsize=8)
    s = results["setup"]
    ax.set_ylabel("decode ms / token (lower is better)")
    ax.set_title(f"budget {s['budget']}, storage {s['storage']}, batch {s['batch']}; "
                 f"disk {results['machine']['disk_read_GBps']:.2f} GB/s", fontsize=9)
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
