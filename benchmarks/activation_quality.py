"""What int8 activations cost in perplexity: int8 / int4 values with x exact vs x quantized to int8.

    python benchmarks/activation_quality.py                 # the demo model (SmolLM2-135M), 64 windows of 32 tokens
    python benchmarks/activation_quality.py --model DIR --values int8,int4 --max-windows 128

On the paths with the integer kernel (AVX2: csrc/matvec_qx.c; AVX-512 VNNI: csrc/matvec_qx512.c;
`--path`, default the fastest this CPU has), the fused matvec of quantized values quantizes x to
int8 per 32 columns; the exact path (SPARSEFERRY_EXACT_QUANT=1) rounds only the weights. Both run
the same checkpoint through the streaming runtime on windows of `--seqlen` tokens of the held-out
text, every matmul through the fused kernel as in a decode step (the fused kernel's batch limit,
MATVEC_MAX_BATCH, is raised to the window for this measurement: its numbers do not depend on the
batch); the table gives both perplexities and their ratio. The dense model (transformers) is the
reference row.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import sparseferry.kernels as K
from sparseferry.convert import convert
from sparseferry.demo import ensure_demo_model
from sparseferry.evaluate import perplexity
from sparseferry.text import evaluation_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HuggingFace folder (default: the demo model)")
    ap.add_argument("--values", default="int8,int4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=32)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--text", default="stdlib")
    ap.add_argument("--path", choices=["avx512", "avx2"], help="kernel path (default: the first with int8 activations)")
    args = ap.parse_args()
    paths = K.native.int8_x_paths()
    path = args.path or (paths[0] if paths else None)
    if path not in paths:
        raise SystemExit(f"no int8-activation kernel on the {path or 'native'} path of this CPU")
    os.environ[K.ENV_VAR] = path
    K.MATVEC_MAX_BATCH = max(K.MATVEC_MAX_BATCH, args.seqlen)  # every window through the fused kernel
    model = Path(args.model) if args.model else ensure_demo_model()
    text = evaluation_text(args.text)
    opts = dict(seqlen=args.seqlen, stride=args.seqlen, max_windows=args.max_windows, progress=False)
    dense = perplexity(model, text, **opts)
    print(f"{dense['windows']} windows x {args.seqlen} tokens ({dense['tokens']} scored), kernel path {path}")
    print("| values | group | x exact | x int8 (default) | ratio |\n|---|---|---|---|---|")
    print(f"| dense bf16 (transformers) | - | {dense['ppl']:.3f} | - | - |")
    with tempfile.TemporaryDirectory() as tmp:
        for values in args.values.split(","):
            ck = Path(tmp) / values
            convert(model, ck, values=values, group_size=args.group_size, progress=False)
            ppl = {}
            for exact in ("1", "0"):
                os.environ[K.EXACT_QUANT_ENV] = exact
                ppl[exact] = perplexity(ck, text, **opts)["ppl"]
            os.environ.pop(K.EXACT_QUANT_ENV)
            print(f"| {values} | {args.group_size} | {ppl['1']:.3f} | {ppl['0']:.3f} | {ppl['0'] / ppl['1']:.4f}x |")


if __name__ == "__main__":
    main()
