"""What pruning costs in perplexity: dense vs magnitude / Wanda / SparseGPT at several sparsities and 2:4.

    python benchmarks/prune_quality.py                       # the demo model (SmolLM2-135M), quick settings
    python benchmarks/prune_quality.py --model DIR --nsamples 128 --seqlen 2048 --out results.json

Calibration and evaluation text are the two disjoint halves of `sparseferry.text`'s default corpus
(the standard library's docstrings): no download. Each pruned model is written with --save-dense
(a plain HuggingFace folder) into a temporary work folder and evaluated with the same sliding
windows as the dense model. Prints a markdown table (perplexity, and prune time in seconds) and
writes every number, with the settings and versions, to JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import sparseferry
from sparseferry.evaluate import perplexity
from sparseferry.prune import prune


def setting_kwargs(setting: str) -> dict:
    """"0.5" -> unstructured 50%; "2:4" -> the N:M pattern."""
    return {"pattern": setting} if ":" in setting else {"sparsity": float(setting)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HuggingFace folder (default: the demo model, exported once)")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--settings", default="0.5,0.6,0.7,2:4", help="sparsities and N:M patterns, comma-separated")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length (default 512)")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-stride", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=24, help="evaluation windows (default 24)")
    ap.add_argument("--workdir", default=None, help="where pruned models go (default: a temp folder, removed)")
    ap.add_argument("--out", default="prune_quality.json")
    a = ap.parse_args(argv)

    from sparseferry.text import calibration_text, evaluation_text

    model = Path(a.model) if a.model else __import__("sparseferry.demo", fromlist=["x"]).ensure_demo_model()
    calib, evaltext = calibration_text(), evaluation_text()
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="prune-quality-"))
    ev = dict(seqlen=a.eval_seqlen, stride=a.eval_stride, max_windows=a.max_windows, progress=False)
    results = {"model": str(model), "settings": vars(a), "torch": torch.__version__, "transformers": transformers.__version__,
               "sparseferry": sparseferry.__version__, "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "runs": []}
    try:
        t0 = time.perf_counter()
        dense = perplexity(model, evaltext, **ev)
        results["dense"] = dict(dense, eval_seconds=time.perf_counter() - t0)
        print(f"dense: ppl {dense['ppl']:.3f} over {dense['tokens']} tokens", file=sys.stderr)
        for method in a.methods.split(","):
            for setting in a.settings.split(","):
                dst = work / f"{method}-{setting.replace(':', 'of')}"
                rep = prune(model, dst, method=method, calibration=calib, nsamples=a.nsamples, seqlen=a.seqlen,
                            save_dense=True, progress=False, **setting_kwargs(setting))
                res = perplexity(dst, evaltext, **ev)
                run = {"method": method, "setting": setting, "ppl": res["ppl"], "nll": res["nll"],
                       "prune_seconds": rep["seconds"], "overall_sparsity": rep["overall_sparsity"],
                       "nm_valid": rep["nm_valid"], "memory_estimate": rep["memory_estimate"]["total"]}
                results["runs"].append(run)
                print(f"{method} {setting}: ppl {res['ppl']:.3f} (pruned in {rep['seconds']:.0f} s)", file=sys.stderr)
                shutil.rmtree(dst)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
        Path(a.out).write_text(json.dumps(results, indent=1))

    settings = a.settings.split(",")
    head = "| method | " + " | ".join(s if ":" in s else f"{float(s):.0%}" for s in settings) + " |"
    print(head)
    print("|" + "---|" * (len(settings) + 1))
    print(f"| dense | {results['dense']['ppl']:.2f} |" + " |" * (len(settings) - 1))
    for method in a.methods.split(","):
        cells = []
        for s in settings:
            r = next(r for r in results["runs"] if r["method"] == method and r["setting"] == s)
            cells.append(f"{r['ppl']:.2f} ({r['prune_seconds']:.0f} s)")
        print(f"| {method} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
