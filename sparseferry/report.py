"""`sparseferry inspect`: what a checkpoint holds, per layer and in total."""
from __future__ import annotations

from .store import open_checkpoint


def _values_label(t) -> str:
    """How a tensor's non-zero values are stored: its dtype, or "int4/g128", "int8/row"."""
    if t.values in (None, str(t.dtype).removeprefix("torch.")) or t.encoding == "dense":
        return str(t.dtype).removeprefix("torch.")
    return f"{t.values}/{'row' if t.group_size == 0 else f'g{t.group_size}'}"


def _quant_stats(tensors) -> dict:
    """values (labels of the bitmap tensors' values, joined) and the relative reconstruction errors
    ||W - dequantized W||_F / ||W||_F of the quantized ones, recorded at convert time (max and mean)."""
    labels = sorted({_values_label(t) for t in tensors if t.encoding == "bitmap"})
    errs = [t.rel_error for t in tensors if t.rel_error is not None]
    return {
        "values": ",".join(labels) or "-",
        "quantized": len(errs),
        "rel_error_max": max(errs) if errs else None,
        "rel_error_mean": sum(errs) / len(errs) if errs else None,
    }


def _pieces(ckpt, names) -> list:
    """The ordinary entries of `names`: an expert parameter counts as its E per-expert entries."""
    return [sub for n in names for sub in (ckpt.tensors[n].experts or [ckpt.tensors[n]])]


def _sparsity(pieces) -> float:
    """Sparsity over the bitmap-encoded entries."""
    enc = [t for t in pieces if t.encoding == "bitmap"]
    elems = sum(t.dense_bytes // t.dtype.itemsize for t in enc)
    return 1 - sum(t.nnz for t in enc) / elems if elems else 0.0


def _expert_stats(ckpt, i: int) -> dict:
    """Layer i's experts: count, expert parameters, stored bytes of all experts and of the largest
    one (one expert's range: what reading one routed expert costs), sparsity of the expert matrices."""
    names = ckpt.expert_params(i)
    n = ckpt.num_experts(i)
    if not names:
        return {"experts": 0}
    return {
        "experts": n,
        "expert_params": len(names),
        "expert_bytes": sum(ckpt.expert_bytes(i, e) for e in range(n)),
        "expert_bytes_max": max(ckpt.expert_bytes(i, e) for e in range(n)),
        "base_bytes": ckpt.base_bytes(i),
        "expert_sparsity": _sparsity(_pieces(ckpt, names)),
    }


def inspect_checkpoint(path, verify: bool = False) -> dict:
    """Per-layer and total sparsity, dense bytes, stored bytes and compression ratio.

    For quantized values (int8/int4), also the value format and the relative reconstruction error
    of the layer's matrices (max and mean over them, as recorded by `convert`). For a layer with
    experts, also their number, their stored bytes (all of them, and the largest single expert's
    range) and their sparsity; each expert's matrices count as bitmap-encoded tensors.
    With verify, every checksum and bitmap is checked first (raises CheckpointError on a problem).
    """
    ckpt = open_checkpoint(path)
    if verify:
        ckpt.verify()
    rows = []
    groups = [(f"layer {i}", ckpt.layer_tensors(i)) for i in range(ckpt.num_layers)]
    groups.append(("other", ckpt.non_layer_tensors()))
    for k, (label, names) in enumerate(groups):
        pieces = _pieces(ckpt, names)
        dense, stored = ckpt.dense_bytes(names), ckpt.stored_bytes(names)
        rows.append({
            "group": label,
            "tensors": len(names),
            "encoded": sum(t.encoding == "bitmap" for t in pieces),
            "sparsity": _sparsity(pieces),  # over the bitmap-encoded tensors
            "dense_bytes": dense,
            "stored_bytes": stored,
            "ratio": stored / dense if dense else 1.0,
            **_quant_stats(pieces),
            **(_expert_stats(ckpt, k) if k < ckpt.num_layers else {}),
        })
    dense, stored = ckpt.dense_bytes(), ckpt.stored_bytes()
    pieces = _pieces(ckpt, list(ckpt.tensors))
    return {
        "path": str(ckpt.path),
        "architecture": ckpt.manifest.get("architecture"),
        "format_version": ckpt.manifest["format_version"],
        "num_layers": ckpt.num_layers,
        "verified": verify,
        "layers": rows,
        "total": {
            "tensors": len(ckpt.tensors),
            "encoded": sum(t.encoding == "bitmap" for t in pieces),
            "sparsity": _sparsity(pieces),
            "dense_bytes": dense,
            "stored_bytes": stored,
            "ratio": stored / dense if dense else 1.0,
            **_quant_stats(pieces),
            "experts": sum(r.get("experts", 0) for r in rows),
            "expert_bytes": sum(r.get("expert_bytes", 0) for r in rows),
        },
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:10.2f}"


def render_inspect(rep: dict) -> str:
    out = [f"{rep['path']}  ({rep['architecture']}, format v{rep['format_version']}, {rep['num_layers']} layers)"
           + ("  checksums OK" if rep["verified"] else "")]
    quant = rep["total"].get("quantized", 0) > 0  # columns of quantized values only when there are some
    head = f"{'group':<10} {'tensors':>7} {'bitmap':>6} {'sparsity':>8} {'dense MiB':>10} {'stored MiB':>10} {'ratio':>6}"
    moe = rep["total"].get("experts", 0) > 0  # expert columns only for a model with experts
    out.append(head + (f" {'values':>10} {'rel.err max':>11} {'mean':>8}" if quant else "")
               + (f" {'experts':>7} {'expert MiB':>10} {'max/expert':>10} {'exp.spars':>9}" if moe else ""))
    for r in rep["layers"] + [dict(rep["total"], group="total")]:
        line = (f"{r['group']:<10} {r['tensors']:>7} {r['encoded']:>6} {r['sparsity']:>8.3f} {_mb(r['dense_bytes'])} "
                f"{_mb(r['stored_bytes'])} {r['ratio']:>6.3f}")
        if quant:
            emax, emean = r.get("rel_error_max"), r.get("rel_error_mean")
            line += f" {r['values']:>10} " + (f"{emax:>11.5f} {emean:>8.5f}" if emax is not None else f"{'-':>11} {'-':>8}")
        if moe and r.get("expert_params"):
            line += (f" {r['experts']:>7} {_mb(r['expert_bytes'])} {r['expert_bytes_max'] / 2**20:>10.4f} "
                     f"{r['expert_sparsity']:>9.3f}")
        elif moe and r["group"] == "total":
            line += f" {r['experts']:>7} {_mb(r['expert_bytes'])}"
        out.append(line)
    return "\n".join(out)
