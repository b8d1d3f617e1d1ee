"""`sparseferry prune`: magnitude, Wanda and SparseGPT pruning, unstructured or N:M, layer by layer.

One calibration loop serves every method (they differ only in what their pruner accumulates and how
it picks the mask, see magnitude.py / wanda.py / sparsegpt.py):

    capture the inputs of decoder layer 0 for every calibration sample     (calibration.py)
    for each decoder layer i:
        read layer i from the source, in fp32                               (source.py)
        run it on the samples, each linear's pruner accumulating statistics
            (and each experts module recording what its router sent it)     (experts.py)
        prune every linear of the layer, and every expert of its experts
            modules on its routed tokens; round to the source dtype; check the sparsity achieved
        run the pruned layer: its outputs are layer i+1's inputs
        write layer i (sparseferry checkpoint, or dense HF shards); free it  (output.py)

Memory: one layer plus the calibration activations, estimated beforehand (memory.py) and checked
against `budget`, so a model larger than RAM can be pruned. Magnitude pruning needs no samples and
no forward pass at all.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .calibration import (
    capture_layer_inputs,
    collect_statistics,
    linear_modules,
    run_layer,
    scoring_weight,
)
from .experts import experts_modules, prune_experts, record_routed_inputs, routing_gates, RoutedInputs
from .magnitude import Magnitude
from .masks import PruneError, check_sparsity, nm_valid, parse_pattern
from .memory import estimate_memory
from .samples import calibration_samples, looks_like_path
from .source import open_source
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}
COMPUTE_DTYPE = torch.float32  # calibration forward passes and pruning arithmetic


def _config_int(config, *names) -> int | None:
    get_text = getattr(config, "get_text_config", None)
    cfg = get_text() if get_text is not None else config
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int):
            return v
    return None


BUILTIN_CALIBRATION = "built-in text: Python standard-library docstrings (sparseferry.text)"


def _describe(calibration) -> str | None:
    if calibration is None:
        return None
    if isinstance(calibration, (list, tuple)):
        return f"{len(calibration)} token-id tensors"
    return str(Path(calibration).resolve()) if looks_like_path(calibration) else f"text of {len(calibration)} characters"


def prune(model_or_dir, dst, *, method: str = "wanda", sparsity: float = 0.5, pattern=None, calibration=None,
          nsamples: int = 128, seqlen: int = 2048, seed: int = 0, per_row: bool = False, budget=None,
          save_dense: bool = False, progress: bool = True) -> dict:
    """Prune the linear weights of every decoder layer, and each expert of its mixtures of experts
    (experts.py: on the calibration tokens routed to it), and write the result to `dst`.

    Args:
        model_or_dir: a HuggingFace model folder (read tensor by tensor), or a transformers causal LM in
            memory (its decoder layers are pruned in place).
        dst: output folder, must not exist. A sparseferry checkpoint (linear weights bitmap-encoded), or
            with `save_dense` a HuggingFace folder with the zeros stored densely, loadable by transformers.
        method: "magnitude" (no calibration needed), "wanda" or "sparsegpt".
        sparsity: fraction of each linear weight set to zero, in [0, 1). Ignored with a pattern.
        pattern: "N:M" (e.g. "2:4"): keep N of every M consecutive input weights of each output row;
            the sparsity is then (M-N)/M.
        calibration: a text/JSONL file path, a str of text, or a list of token-id tensors; None (wanda,
            sparsegpt): the built-in text, the calibration half of `sparseferry.text.calibration_text()`
            (the report says so).
        nsamples, seqlen, seed: `nsamples` random windows of `seqlen` tokens of the calibration text.
        per_row: magnitude and SparseGPT pick the pruned weights within each output row, not the whole
            matrix (block). Wanda always works per row.
        budget: bytes or a size string ("8GiB"); the run stops before any work when its estimated peak
            memory exceeds it, naming the minimum.
        progress: a progress bar per layer with the ETA.
    Returns:
        a report: method, sparsity, pattern, per-tensor achieved sparsity and N:M validity (per expert
        matrix: its expert, method used and routed tokens), per-layer seconds and relative output error
        on the calibration samples, per experts module the tokens each expert saw ("experts"), memory
        estimate, total seconds.
    Raises:
        PruneError (bad arguments or calibration data, budget too small), ModelError, CheckpointError:
        all SparseferryError; `dst` is then not created.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise PruneError(f"unknown pruning method {method!r} (choose from {', '.join(METHODS)})")
    pat = parse_pattern(pattern)
    sparsity = (pat[1] - pat[0]) / pat[1] if pat else check_sparsity(sparsity)
    pruner_cls = METHODS[method]
    calibrated = pruner_cls.needs_calibration
    builtin = calibrated and calibration is None  # the default: the built-in text (sparseferry.text)
    dst = Path(dst)
    if dst.exists():
        raise PruneError(f"{dst}: already exists (choose a new output folder)")
    from ..runtime.budget import format_bytes, parse_budget

    budget_bytes = parse_budget(budget)

    source = open_source(model_or_dir)
    info, layers = source.info, source.layers
    linear_shapes = [prunable_shapes(layers[i]) for i in range(info.num_layers)]
    expert_shapes = [experts_shapes(layers[i]) for i in range(info.num_layers)]
    if pat is not None:
        for i, lin in enumerate(linear_shapes + expert_shapes):
            for n, (_, cols) in lin.items():
                if cols % pat[1]:
                    name = f"{info.layers_prefix}.{i % info.num_layers}.{n}"
                    raise PruneError(f"{name if i >= info.num_layers else name + '.weight'}: {cols} input columns are not "
                                     f"divisible by M={pat[1]} of the {pat[0]}:{pat[1]} pattern")
    if not any(linear_shapes) and not any(expert_shapes):
        raise PruneError(f"{source.name}: no linear layers inside the decoder layers ({info.layers_prefix}) to prune")

    non_layer = [n for n in source.stored_names if info.layer_of(n) is None]
    params = {**dict(source.model.named_parameters(remove_duplicate=False)), **dict(source.model.named_buffers())}
    est = estimate_memory(
        layer_shapes=[{n: tuple(p.shape) for n, p in layers[i].named_parameters()} for i in range(info.num_layers)],
        linear_shapes=linear_shapes,
        non_layer_compute=sum(params[n].numel() for n in non_layer if n not in info.top_linear_weights) if calibrated else 0,
        non_layer_stored=sum(params[n].numel() for n in non_layer) * source.itemsize,
        source_itemsize=source.itemsize, method=method, nsamples=nsamples, seqlen=seqlen,
        hidden=_config_int(source.config, "hidden_size", "n_embd", "d_model") or 0,
        heads=_config_int(source.config, "num_attention_heads", "n_head") or 1, calibrated=calibrated,
        expert_shapes=expert_shapes, top_k=_config_int(source.config, "num_experts_per_tok", "moe_top_k", "top_k") or 8)
    if budget_bytes is not None and est.total > budget_bytes:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in est.as_dict().items() if k != "total")
        hint = "; lower --nsamples or --seqlen" if calibrated else ""
        raise PruneError(f"budget {format_bytes(budget_bytes)} is too small: pruning {source.name} with {method} needs at least "
                         f"{format_bytes(est.total)} ({parts}){hint}")

    samples = None
    if calibrated:
        if builtin:
            from ..text import calibration_text

            calibration = calibration_text("stdlib")
        samples = calibration_samples(calibration, source.tokenizer(), nsamples=nsamples, seqlen=seqlen, seed=seed)

    meta = {"method": method, "sparsity": sparsity, "pattern": f"{pat[0]}:{pat[1]}" if pat else None,
            "per_row": bool(per_row), "calibration": (BUILTIN_CALIBRATION if builtin else _describe(calibration)) if calibrated else None,
            "nsamples": len(samples) if samples else 0, "seqlen": int(samples[0].shape[1]) if samples else 0, "seed": seed}
    from .output import DenseSink, SparseferrySink

    report = {**meta, "source": source.name, "dst": str(dst), "format": "hf-dense" if save_dense else "sparseferry",
              "memory_estimate": est.as_dict(), "budget": budget_bytes, "tensors": [], "layers": [], "experts": []}
    with torch.no_grad(), (DenseSink if save_dense else SparseferrySink)(dst, source, meta) as sink:
        sink.write(None, {n: source.tensor(n) for n in non_layer})
        inputs = outs = None
        if calibrated:
            source.materialize_non_layer(COMPUTE_DTYPE)
            inputs = capture_layer_inputs(source.model, layers, samples, COMPUTE_DTYPE)
            outs = torch.empty_like(inputs.hidden)  # [nsamples, seqlen, hidden]
        from tqdm import tqdm

        for i in tqdm(range(info.num_layers), desc=f"prune {method}", unit="layer", disable=not progress):
            t1 = time.perf_counter()
            if calibrated:
                inputs.select(i)
            entry = _prune_layer(source, i, pruner_cls, sparsity, pat, per_row, inputs, outs, sink, report["tensors"],
                                 report["experts"])
            if calibrated:
                inputs.hidden, outs = outs, inputs.hidden
            report["layers"].append({"layer": i, "seconds": time.perf_counter() - t1, **entry})
        sink.commit()
    pruned = report["tensors"]
    total = sum(t["numel"] for t in pruned)
    report["overall_sparsity"] = sum(t["sparsity"] * t["numel"] for t in pruned) / total if total else 0.0
    report["nm_valid"] = all(t["nm_valid"] for t in pruned) if pat else None
    report["seconds"] = time.perf_counter() - t0
    return report


def prunable_shapes(layer) -> dict[str, tuple[int, int]]:
    """{linear name: (rows, cols)} of the linears of a decoder layer that are pruned (routing gates are not)."""
    gates = routing_gates(layer, experts_modules(layer))
    return {n: tuple(scoring_weight(m).shape) for n, m in linear_modules(layer).items() if n not in gates}


def experts_shapes(layer) -> dict[str, tuple[int, int]]:
    """{"module.param": (rows, cols)} of one expert's matrices, for each experts module of a decoder layer."""
    return {f"{n}.{p}": tuple(spec.view(p, 0).shape) for n, spec in experts_modules(layer).items() for p in spec.matrices}


def _prune_layer(source, i: int, pruner_cls, sparsity: float, pat, per_row: bool, inputs, outs, sink, tensor_report: list,
                 experts_report: list) -> dict:
    """Prune decoder layer i and write it; with calibration, leave the pruned layer's outputs in `outs`
    (which holds the dense outputs meanwhile). Returns the layer's entry for the report."""
    info = source.info
    prefix = f"{info.layers_prefix}.{i}."
    names = [n for n in info.layer_params(i) if n not in source.tied] + [b for b in source.buffers if info.layer_of(b) == i]
    orig = {n: source.tensor(n) for n in names}  # source dtype and layout
    layer = source.load_layer(i, orig, COMPUTE_DTYPE)
    experts = experts_modules(layer)
    gates = routing_gates(layer, experts)
    mods = {n: m for n, m in linear_modules(layer).items() if n not in gates}
    pruners = {name: pruner_cls(scoring_weight(mod).shape[1]) for name, mod in mods.items()}
    routed = {n: RoutedInputs() for n, spec in experts.items() if spec.routed} if inputs is not None else {}
    if inputs is not None:
        hooks = [record_routed_inputs(experts[n], r) for n, r in routed.items()]
        try:
            collect_statistics(layer, pruners, inputs, outs)  # outs: the dense layer's outputs
        finally:
            for h in hooks:
                h.remove()
    written = dict(orig)
    for name, mod in mods.items():
        full = f"{prefix}{name}.weight"
        pruner = pruners.pop(name)
        w = scoring_weight(mod)  # [out, in], fp32 view of the layer's weight
        new = pruner.prune(w, sparsity, pat, per_row).to(orig[full].dtype)  # rounded to the source dtype
        expected = pruner.expected_pruned(tuple(w.shape), sparsity, pat, per_row)
        del pruner  # frees its statistics (a SparseGPT Hessian is [cols, cols])
        tensor_report.append(check_pruned(full, new, expected, pat))
        w.copy_(new)  # the layer now computes with the pruned, rounded weights
        written[full] = new if isinstance(mod, torch.nn.Linear) else new.T.contiguous()
    for name, spec in experts.items():
        dtype = orig[f"{prefix}{name}.{spec.matrices[0]}"].dtype

        def check(full, new, expected, dtype=dtype):
            new = new.to(dtype)
            return new, check_pruned(full, new, expected, pat)

        entries, summary = prune_experts(spec, pruner_cls, sparsity, pat, per_row, routed.pop(name, None), prefix, check)
        tensor_report.extend(entries)
        experts_report.append({"layer": i, **summary})
        for p in spec.matrices:
            full = f"{prefix}{name}.{p}"
            written[full] = getattr(spec.module, p).detach().to(orig[full].dtype)
    entry = {"rel_error": None, "output_mean_sq": None}
    if inputs is not None:
        acc = {"err": 0.0, "ref": 0.0, "out": 0.0}

        def compare(j, y):
            ref = outs[j : j + 1]
            acc["err"] += float((y - ref).double().square().sum())
            acc["ref"] += float(ref.double().square().sum())
            acc["out"] += float(y.double().square().sum())

        run_layer(layer, inputs, outs, on_output=compare)
        entry = {"rel_error": (acc["err"] / acc["ref"]) ** 0.5 if acc["ref"] else 0.0,
                 "output_mean_sq": acc["out"] / outs.numel()}
    sink.write(i, written)
    source.release_layer(i)
    return entry


def check_pruned(name: str, w: torch.Tensor, expected: int, pat) -> dict:
    """The report entry of a pruned weight w [out, in]; raises PruneError if it has fewer than `expected`
    zeros or breaks the N:M pattern (a bug, never a property of the model)."""
    zeros = w.numel() - int(torch.count_nonzero(w))
    valid = nm_valid(w, *pat) if pat else None
    if zeros < expected or valid is False:
        what = f"{zeros} zeros, expected at least {expected}" if zeros < expected else f"not {pat[0]}:{pat[1]}"
        raise PruneError(f"{name}: pruning produced {what}")
    return {"name": name, "shape": list(w.shape), "numel": w.numel(), "sparsity": zeros / w.numel(),
            "target": expected / w.numel(), "nm_valid": valid}


def render_report(report: dict) -> str:
    """The report as a table: one row per pruned tensor (one per expert parameter, over its experts), one
    per layer, the tokens routed to each experts module's experts, then the totals."""
    lines = [f"{'tensor':<48} {'shape':>13} {'sparsity':>9} {'target':>8} {'N:M':>5}"]
    rows: dict[str, list[dict]] = {}
    for t in report["tensors"]:
        rows.setdefault(t["name"].rpartition("[")[0] + "[*]" if "expert" in t else t["name"], []).append(t)
    for name, ts in rows.items():
        nm = "-" if ts[0]["nm_valid"] is None else ("ok" if all(t["nm_valid"] for t in ts) else "BAD")
        shape = "x".join(str(s) for s in ts[0]["shape"])
        if len(ts) > 1:
            shape = f"{len(ts)}x{shape}"
        lines.append(f"{name:<48} {shape:>13} {min(t['sparsity'] for t in ts):>9.4f} {max(t['target'] for t in ts):>8.4f} {nm:>5}")
    lines.append("")
    lines.append(f"{'layer':>5} {'seconds':>8} {'rel. output error':>17}")
    for e in report["layers"]:
        err = "-" if e["rel_error"] is None else f"{e['rel_error']:.4f}"
        lines.append(f"{e['layer']:>5} {e['seconds']:>8.2f} {err:>17}")
    if report.get("experts"):
        lines.append("")
        for x in report["experts"]:
            if x["tokens"] is None:
                how = x.get("note") or "magnitude per expert"
            else:
                tok = sorted(x["tokens"])
                how = (f"routed calibration tokens per expert: min {tok[0]}, median {tok[len(tok) // 2]}, max {tok[-1]}"
                       + (f"; {len(x['no_tokens'])} experts saw none (magnitude): {x['no_tokens']}" if x["no_tokens"] else ""))
            lines.append(f"{x['module']} ({x['num_experts']} experts): {how}")
    pattern = f", pattern {report['pattern']}" if report["pattern"] else ""
    nm = "" if report["nm_valid"] is None else f", N:M {'valid' if report['nm_valid'] else 'INVALID'}"
    lines.append("")
    lines.append(f"{report['method']} to {report['sparsity']:.2%}{pattern}: {len(report['tensors'])} tensors, overall sparsity "
                 f"{report['overall_sparsity']:.4f}{nm}; wrote {report['dst']} ({report['format']}) in {report['seconds']:.1f} s")
    return "\n".join(lines)


__all__ = ["METHODS", "PruneError", "check_pruned", "prune", "render_report"]
