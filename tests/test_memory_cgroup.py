"""The memory budget, measured from outside the process: `generate` completes in a memory cgroup of
idle footprint + budget + allowance(batch, length), page cache charged, at batch 1 and 8.

Skipped where no memory cgroup can be created (no root, no writable cgroup v2 / v1 memory controller).
The model is a synthetic Llama with a 32000-token vocabulary, so that the output head is large
against the allowance: a copy of it per sequence (what a strided head input used to cost) does not fit.
"""
from __future__ import annotations

import pytest

from sparseferry.bench.cgroup import MemoryCgroup, measure_generate
from sparseferry.convert import convert
from sparseferry.synth import Shape, synth


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    probe = MemoryCgroup.create("sparseferry-probe")
    if probe is None:
        pytest.skip(f"no writable memory cgroup here: {MemoryCgroup.unavailable}")
    probe.remove()
    base = tmp_path_factory.mktemp("mem")
    synth(base / "hf", shape=Shape(512, 1408, 4, 8, 2, vocab=32000), sparsity=0.5, progress=False)
    convert(base / "hf", base / "ck", progress=False)
    return base / "ck"


def test_generate_fits_in_a_cgroup_of_budget_plus_allowance_at_batch_1_and_8(ckpt):
    res = measure_generate(ckpt, budget="60%", batches=[1, 8], prompt_tokens=32, new_tokens=8)
    for r in res["rows"]:
        assert r["completed"], (f"batch {r['batch']}: {'OOM-killed' if r['oom_killed'] else r['error']} in a cgroup of "
                                f"{r['limit_bytes'] / 2**20:.0f} MiB (idle {r['idle_bytes'] / 2**20:.0f} + budget "
                                f"{r['budget_bytes'] / 2**20:.0f} + allowance {r['allowance']['total'] / 2**20:.0f})")
        assert 0 < r["peak_bytes"] <= r["limit_bytes"]
    assert res["rows"][1]["allowance"]["total"] > res["rows"][0]["allowance"]["total"]
