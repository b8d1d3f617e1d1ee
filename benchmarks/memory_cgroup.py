"""`sparseferry generate` inside a memory cgroup of budget + allowance + idle footprint, page cache charged.

    python benchmarks/memory_cgroup.py CKPT --budget 30% --batch 1 8 [--prompt-tokens 32 --new-tokens 16] [--json]

For each batch size: the page cache of the checkpoint's files is emptied, then `generate` runs in a
cgroup whose hard limit (memory + page cache, no swap) is

    idle footprint   peak of a process that does what generate does before loading weights (imports,
                     tokenizer, model skeleton on meta), in the same cgroup
  + budget           the weight budget given to generate
  + allowance        sparseferry.runtime.allowance: KV cache, activations, logits, runtime slack (batch, length)

and the script reports whether it completed or was OOM-killed, and its peak charge. Needs root and a
writable cgroup v2 (or v1) memory controller; exits 2 saying why otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys

from sparseferry.bench.cgroup import measure_generate
from sparseferry.runtime.budget import format_bytes

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("--budget", default="30%")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--extra-mb", type=float, default=0.0, help="add to the limit (negative: tighter)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = measure_generate(a.ckpt, budget=a.budget, batches=a.batch, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens,
                  extra_bytes=int(a.extra_mb * 2**20))
    if res is None:
        from sparseferry.bench.cgroup import MemoryCgroup

        print(f"no writable memory cgroup: {MemoryCgroup.unavailable}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(res, indent=1))
        return 0 if all(r["completed"] for r in res["rows"]) else 1
    print(f"{res['checkpoint']} (cgroup {res['cgroup']}, budget {res['budget']})")
    print(f"{'batch':>5} {'limit':>10} {'= idle':>9} {'+ budget':>9} {'+ allow.':>9} {'peak':>10} {'result':>10} {'tok/s':>7}")
    for r in res["rows"]:
        fb = format_bytes
        print(f"{r['batch']:>5} {fb(r['limit_bytes']):>10} {fb(r['idle_bytes']):>9} {fb(r['budget_bytes']):>9} "
              f"{fb(r['allowance']['total']):>9} {fb(r['peak_bytes']):>10} "
              f"{'completed' if r['completed'] else ('OOM-killed' if r['oom_killed'] else 'failed'):>10} "
              f"{(r['decode_tokens_per_s'] or 0):>7.2f}" + (f"  ({r['error']})" if r['error'] else ""))
    return 0 if all(r["completed"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
