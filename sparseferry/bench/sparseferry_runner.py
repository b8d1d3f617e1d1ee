"""sparseferry, timed the same way as the baseline.

    python -m sparseferry.bench.sparseferry_runner SPEC.json RESULT.json

`sparseferry.load(checkpoint, memory_budget=budget_bytes, storage=...)` with direct I/O: disk-tier
layers are read with O_DIRECT at every use, so no per-pass emptying of the page cache is needed (the
bytes read per token, counted by the kernel, confirm it); the cache is emptied before each repetition.
Besides the timings, each repetition keeps the runtime's own time split (`engine.summary()`).

Spec keys: checkpoint, budget_bytes, storage, prompt_ids, new_tokens, warmup, reps, pad_token_id, threads.
"""
from __future__ import annotations

import time

from .measure import event, measure, worker_main

_SPLIT = ("io_wait_s", "decompress_s", "compute_s", "bytes_read", "decode_s_per_step", "prefill_s", "io_wait_share",
          # the read path's own figures, where the runtime reports them (shown when present)
          "read_gbps", "read_s_per_token", "compute_s_per_token", "overlap")


def idle(spec: dict) -> dict:
    """Everything but the weights (the cgroup scenario's idle footprint): the runtime's imports, the
    checkpoint's manifest and the model skeleton."""
    from ..hf import info_from_config_dict
    from ..runtime import load  # noqa: F401 - the imports a real run makes
    from ..store import open_checkpoint

    info_from_config_dict(open_checkpoint(spec["checkpoint"]).config)
    return {"idle": True}


def run(spec: dict) -> dict:
    from ..runtime import load

    if spec.get("idle"):
        return idle(spec)
    event("load")
    t = time.perf_counter()
    model = load(spec["checkpoint"], device="cpu", memory_budget=spec["budget_bytes"], storage=spec["storage"],
                 direct_io=True)
    load_s = time.perf_counter() - t
    engine = model.sparseferry
    plan = engine.plan

    def stats(reset: bool) -> dict | None:
        if reset:
            engine.reset_stats()
            return None
        s = engine.summary()
        out = {k: s.get(k) for k in _SPLIT}
        for k, v in (s.get("experts") or {}).items():  # MoE: hit rate, predicted/missed reads, bytes vs routing
            out[f"experts_{k}"] = v
        return out

    try:
        res = measure(model, spec, drop_paths=[spec["checkpoint"]], drop_each_pass=False, stats=stats)
    finally:
        engine.close()
    streamed = sum(s for t, s in zip(plan.tiers, plan.layer_stored_bytes) if t in ("disk", "host"))
    res.update(load_s=load_s, plan={t: plan.count(t) for t in ("dense", "compressed", "host", "disk")},
               plan_summary=plan.summary(), device_weight_bytes=plan.device_bytes,
               weights_ram_bytes=plan.device_bytes + (streamed if spec["storage"] == "host" else 0),
               weights_disk_bytes=streamed if spec["storage"] == "disk" else 0)
    return res


if __name__ == "__main__":
    raise SystemExit(worker_main(run))
