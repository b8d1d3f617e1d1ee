"""`sparseferry bench-serve`: what continuous batching buys a model streamed from disk.

For each number of concurrent requests N, N requests with random prompts of the same length
arrive together at the batcher (in process, no HTTP) and each generates exactly `new_tokens`
tokens (EOS ignored). Reported per point: aggregate decode tokens/s (tokens generated after every
request has its first token, over that time), mean time to first token, disk bytes read per
generated token, and per decode step the time computing vs waiting for the disk — so where the
CPU, not the disk, becomes the limit, it shows.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def bench_serve(checkpoint, *, budget="30%", clients=(1, 2, 4, 8, 16), prompt_tokens: int = 32, new_tokens: int = 16,
                storage: str = "disk", seed: int = 0, out=None, progress: bool = True) -> dict:
    from tqdm import tqdm

    from ..runtime import load, load_tokenizer
    from .batcher import Batcher, BatcherStats, Request
    from .sampling import SamplingParams

    model = load(checkpoint, memory_budget=budget, storage=storage)
    try:
        tokenizer = load_tokenizer(checkpoint)
    except Exception:  # noqa: BLE001 - synthetic checkpoints may have no tokenizer: token ids are enough
        tokenizer = None
    try:
        batcher = Batcher(model, tokenizer, max_batch=max(clients), prefill_chunk=max(clients) * prompt_tokens,
                          max_queue=max(clients), kv_budget=max(clients) * (prompt_tokens + new_tokens) * _kv_bytes(model))
        batcher.eos = set()  # every request generates exactly new_tokens
        vocab = model.config.get_text_config().vocab_size
        gen = torch.Generator().manual_seed(seed)
        params = SamplingParams(max_tokens=new_tokens, temperature=0)

        def one_point(n):
            batcher.stats = BatcherStats()
            reqs = [Request(prompt=torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist(), params=params,
                            sink=lambda ev: None) for _ in range(n)]
            t0 = time.perf_counter()
            for r in reqs:
                r.t_submit = t0
                batcher.submit(r)
            batcher.run_until_idle()
            t_end = time.perf_counter()
            last_first = max(r.t_first for r in reqs)
            decode = [s for s in batcher.stats.recent if s.t_end > last_first]
            dtok = sum(s.generated for s in decode)
            dsec = t_end - last_first
            return {
                "clients": n,
                "decode_tokens_per_s": dtok / dsec if dsec else None,
                "ttft_s": sum(r.t_first - r.t_submit for r in reqs) / n,
                "wall_s": t_end - t0,
                "generated_tokens": sum(len(r.generated) for r in reqs),
                "bytes_read_per_token": sum(s.bytes_read for s in decode) / dtok if dtok else None,
                "decode_step_s": sum(s.seconds for s in decode) / len(decode) if decode else None,
                "decode_io_wait_s": sum(s.io_wait_s for s in decode) / len(decode) if decode else None,
                "decode_compute_s": sum(s.seconds - s.io_wait_s for s in decode) / len(decode) if decode else None,
            }

        one_point(1)  # warm-up (imports, kernels, first reads)
        points = [one_point(n) for n in tqdm(clients, desc="bench-serve", disable=not progress)]
    finally:
        model.sparseferry.close()
    base = points[0]
    for p in points:
        p["speedup_vs_first"] = p["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base["decode_tokens_per_s"] else None
        p["bytes_per_token_reduction"] = (base["bytes_read_per_token"] / p["bytes_read_per_token"]
                                          if p["bytes_read_per_token"] else None)
    res = {"checkpoint": str(checkpoint), "budget": budget, "storage": storage, "prompt_tokens": prompt_tokens,
           "new_tokens": new_tokens, "plan": model.sparseferry.plan.summary(), "threads": torch.get_num_threads(),
           "points": points}
    if out:
        Path(out).write_text(json.dumps(res, indent=1))
    return res


def _kv_bytes(model) -> int:
    from .kvcache import kv_shape

    return kv_shape(model.config, len(model.sparseferry.layers), model.dtype).bytes_per_token


def render_bench(res: dict) -> str:
    lines = [f"{res['plan']}; prompt {res['prompt_tokens']} tokens, {res['new_tokens']} new tokens each, "
             f"{res['threads']} threads", "",
             "| concurrent requests | decode tokens/s (aggregate) | vs 1 | time to first token s | disk MB read / token | "
             "vs 1 | decode step s | of which I/O wait s | compute s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        lines.append(f"| {p['clients']} | {p['decode_tokens_per_s']:.2f} | {p['speedup_vs_first']:.2f}x | {p['ttft_s']:.2f} | "
                     f"{(p['bytes_read_per_token'] or 0) / 1e6:.1f} | {p['bytes_per_token_reduction'] or 0:.2f}x | "
                     f"{p['decode_step_s']:.3f} | {p['decode_io_wait_s']:.3f} | {p['decode_compute_s']:.3f} |")
    return "\n".join(lines)
