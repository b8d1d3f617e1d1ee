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


def _cmd_generate(a) -> int:
    from .runtime import format_bytes, generate_text, load, load_tokenizer

    model = load(a.dir, device=a.device, memory_budget=a.budget, storage=a.storage, direct_io=not a.page_cache,
                 verify=not a.no_verify)
    engine = model.sparseferry
    try:
        if not a.json:
            print(f"[{engine.plan.summary()}]", file=sys.stderr)
        summary, texts = generate_text(model, load_tokenizer(a.dir), a.prompt, max_new_tokens=a.max_new_tokens,
                                       do_sample=a.temperature > 0, temperature=a.temperature, top_p=a.top_p,
                                       seed=a.seed, stream=not a.json)
    finally:
        engine.close()
    if a.json:
        print(json.dumps(dict(summary, texts=texts)))
    else:
        print()
        tps = summary["decode_tokens_per_s"]
        bpt = summary["bytes_read_per_token"]
        print(f"prefill {summary['prefill_s']:.2f} s | decode {tps or 0:.2f} tok/s | read {format_bytes(bpt or 0)}/token | "
              f"I/O wait {summary['io_wait_s']:.2f} s, decompress {summary['decompress_s']:.2f} s, "
              f"compute {summary['compute_s']:.2f} s | peak RSS {format_bytes(summary['peak_rss_bytes'])}", file=sys.stderr)
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

    p = sub.add_parser("generate", help="generate text from a sparseferry checkpoint under a memory budget")
    p.add_argument("dir", help="sparseferry checkpoint folder")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--budget", default=None, help="memory budget for weights: '4GiB', '512MB' or '30%%' of the stored weights (default: no limit)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--storage", choices=["disk", "host"], default="disk", help="where streamed layers live (default disk)")
    p.add_argument("--page-cache", action="store_true", help="disk reads through the page cache (default: bypass it, O_DIRECT)")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification of streamed layers")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=_cmd_generate)

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
