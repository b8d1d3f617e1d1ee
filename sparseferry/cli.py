"""The `sparseferry` command line: a thin shell over the library.

Each subcommand parses its flags, then calls one library function with keyword arguments; the
parsed namespace never enters library code. Errors from bad input (SparseferryError) print as one
line and exit 1; Ctrl-C exits 130 without a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import SparseferryError


def _cmd_convert(a) -> int:
    from .convert import convert

    stats = convert(a.src, a.dst, encode_lm_head=a.encode_lm_head, encode_embeddings=a.encode_embeddings,
                    dtype=a.dtype, force=a.force, progress=not a.quiet)
    ratio = stats["stored_bytes"] / stats["dense_bytes"] if stats["dense_bytes"] else 1.0
    print(f"wrote {a.dst}: {stats['tensors']} tensors, {stats['dense_bytes'] / 1e9:.3f} GB dense -> "
          f"{stats['stored_bytes'] / 1e9:.3f} GB stored ({ratio:.3f}x), {stats['seconds']:.1f} s, {stats['gbps']:.2f} GB/s")
    return 0


def _cmd_inspect(a) -> int:
    from .report import inspect_checkpoint, render_inspect

    rep = inspect_checkpoint(a.dir, verify=a.verify)
    print(json.dumps(rep, indent=1) if a.json else render_inspect(rep))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sparseferry", description="Run LLMs larger than memory from bitmap-compressed sparse weights.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a HuggingFace checkpoint folder into a sparseferry checkpoint")
    p.add_argument("src", help="HuggingFace model folder (config.json + *.safetensors or *.bin)")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--encode-lm-head", action="store_true", help="also store lm_head in the bitmap format")
    p.add_argument("--encode-embeddings", action="store_true", help="also store the embeddings in the bitmap format")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="cast weights (default: keep)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists (only once the new one is complete)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("inspect", help="per-layer sparsity, sizes and compression of a checkpoint")
    p.add_argument("dir", help="sparseferry checkpoint folder")
    p.add_argument("--verify", action="store_true", help="also verify every checksum and bitmap")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_inspect)

    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except SparseferryError as e:
        print(f"sparseferry: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sparseferry: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
