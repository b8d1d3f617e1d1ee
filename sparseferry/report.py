"""`sparseferry inspect`: what a checkpoint holds, per layer and in total."""
from __future__ import annotations

from .store import open_checkpoint


def inspect_checkpoint(path, verify: bool = False) -> dict:
    """Per-layer and total sparsity, dense bytes, stored bytes and compression ratio.

    With verify, every checksum and bitmap is checked first (raises CheckpointError on a problem).
    """
    ckpt = open_checkpoint(path)
    if verify:
        ckpt.verify()
    rows = []
    groups = [(f"layer {i}", ckpt.layer_tensors(i)) for i in range(ckpt.num_layers)]
    groups.append(("other", ckpt.non_layer_tensors()))
    for label, names in groups:
        enc = [n for n in names if ckpt.tensors[n].encoding == "bitmap"]
        elems = sum(ckpt.tensors[n].dense_bytes // ckpt.tensors[n].dtype.itemsize for n in enc)
        nnz = sum(ckpt.tensors[n].nnz for n in enc)
        dense, stored = ckpt.dense_bytes(names), ckpt.stored_bytes(names)
        rows.append({
            "group": label,
            "tensors": len(names),
            "encoded": len(enc),
            "sparsity": 1 - nnz / elems if elems else 0.0,  # over the bitmap-encoded tensors
            "dense_bytes": dense,
            "stored_bytes": stored,
            "ratio": stored / dense if dense else 1.0,
        })
    dense, stored = ckpt.dense_bytes(), ckpt.stored_bytes()
    enc = [t for t in ckpt.tensors.values() if t.encoding == "bitmap"]
    elems = sum(t.dense_bytes // t.dtype.itemsize for t in enc)
    return {
        "path": str(ckpt.path),
        "architecture": ckpt.manifest.get("architecture"),
        "format_version": ckpt.manifest["format_version"],
        "num_layers": ckpt.num_layers,
        "verified": verify,
        "layers": rows,
        "total": {
            "tensors": len(ckpt.tensors),
            "encoded": len(enc),
            "sparsity": 1 - sum(t.nnz for t in enc) / elems if elems else 0.0,
            "dense_bytes": dense,
            "stored_bytes": stored,
            "ratio": stored / dense if dense else 1.0,
        },
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:10.2f}"


def render_inspect(rep: dict) -> str:
    out = [f"{rep['path']}  ({rep['architecture']}, format v{rep['format_version']}, {rep['num_layers']} layers)"
           + ("  checksums OK" if rep["verified"] else "")]
    out.append(f"{'group':<10} {'tensors':>7} {'bitmap':>6} {'sparsity':>8} {'dense MiB':>10} {'stored MiB':>10} {'ratio':>6}")
    for r in rep["layers"] + [dict(rep["total"], group="total")]:
        out.append(f"{r['group']:<10} {r['tensors']:>7} {r['encoded']:>6} {r['sparsity']:>8.3f} {_mb(r['dense_bytes'])} "
                   f"{_mb(r['stored_bytes'])} {r['ratio']:>6.3f}")
    return "\n".join(out)
