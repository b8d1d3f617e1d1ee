"""The runtime's central invariant: a streamed, compressed model computes what transformers computes.

The oracle is transformers itself running the same (pruned) weights densely. For every supported
architecture and every budget from "everything streamed from disk" to "everything resident", the
logits match and greedy generation produces the same tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ARCHS, RSS_SCRIPT, make_checkpoint

import sparseferry
from sparseferry.validate import seal
from sparseferry.runtime import BudgetError, RuntimeLoadError, parse_budget
from sparseferry.runtime.plan import make_plan
from sparseferry.store import CheckpointError, open_checkpoint


def minimum_budget(ckpt_dir, **load_kw) -> int:
    """The smallest budget `sparseferry.load` accepts, as its error states it."""
    with pytest.raises(BudgetError) as e:
        sparseferry.load(ckpt_dir, memory_budget=1, **load_kw)
    return e.value.minimum_bytes


def budgets(ckpt_dir, slots: bool = False) -> dict[str, object]:
    """Named budgets covering every tier mix for a checkpoint."""
    ckpt = open_checkpoint(ckpt_dir)
    minimum = minimum_budget(ckpt_dir, slots=slots)
    layer = ckpt.stored_bytes(ckpt.layer_tensors(0))
    return {
        "all-dense": None,
        "all-streamed": minimum,
        "mixed": minimum + 2 * layer + 4096,  # a couple of layers resident compressed or dense, the rest from disk
    }


def oracle_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_logits_equal_dense_transformers(arch, dtype, tmp_path):
    folder, ref = make_checkpoint(arch, tmp_path, dtype=dtype, layers=4)
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    want = oracle_logits(ref, ids)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    configs = [("disk", False, None), ("host", False, None), ("disk", False, "dense"),
               ("disk", True, None)]  # slots=True: the CUDA schedule, run on the CPU
    for storage, slots, form in configs:
        for label, budget in budgets(folder, slots).items():
            model = sparseferry.load(folder, memory_budget=budget, storage=storage, slots=slots, resident_form=form)
            try:
                got = oracle_logits(model, ids)
            finally:
                model.sparseferry.close()
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{arch} {label} {storage} slots={slots} {form}: {m}")


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_greedy_generation_matches_transformers_token_for_token(arch, tmp_path):
    folder, ref = make_checkpoint(arch, tmp_path, dtype=torch.float32, layers=3)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=258)
    want = ref.generate(ids, **kw)
    model = sparseferry.load(folder, memory_budget=budgets(folder)["all-streamed"])
    try:
        got = model.generate(ids, **kw)
        summary = model.sparseferry.summary()
    finally:
        model.sparseferry.close()
    assert torch.equal(got, want)
    assert summary["decode_steps"] == 31 and summary["bytes_read_per_token"] > 0
    # the read path of decode: bytes over the time a read was in flight, and the step against
    # max(read, compute), where every step reads the whole model
    assert summary["read_gbps"] > 0 and summary["read_s_per_token"] > 0 and summary["compute_s_per_token"] > 0
    assert summary["read_gbps"] * 1e9 * summary["read_s_per_token"] == pytest.approx(summary["bytes_read_per_token"])
    step = summary["decode_s_per_step"]
    assert summary["overlap"] == pytest.approx(step / max(summary["read_s_per_token"], summary["compute_s_per_token"]))


def test_a_model_held_whole_reports_no_read_path(tmp_path):
    folder, _ = make_checkpoint("llama", tmp_path, dtype=torch.float32, layers=2)
    model = sparseferry.load(folder)
    try:
        model.generate(torch.randint(0, 256, (1, 4)), max_new_tokens=3, do_sample=False, pad_token_id=258)
        summary = model.sparseferry.summary()
    finally:
        model.sparseferry.close()
    assert summary["bytes_read_per_token"] == 0
    assert summary["read_gbps"] is None and summary["overlap"] is None


def test_batched_prompts_with_left_padding_match_transformers(tmp_path):
    folder, ref = make_checkpoint("llama", tmp_path, dtype=torch.float32, layers=3)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, :2] = 0
    ids[mask == 0] = 258
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=258)
    want = ref.generate(ids, **kw)
    model = sparseferry.load(folder, memory_budget=budgets(folder)["mixed"])
    try:
        torch.testing.assert_close(oracle_logits(model, ids, mask), oracle_logits(ref, ids, mask), atol=1e-5, rtol=1e-5)
        got = model.generate(ids, **kw)
    finally:
        model.sparseferry.close()
    assert torch.equal(got, want)


def test_sampling_is_reproducible_with_a_seed(tmp_path):
    folder, ref = make_checkpoint("qwen2", tmp_path, dtype=torch.float32, layers=2)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=0.9, pad_token_id=258)
    torch.manual_seed(7)
    want = ref.generate(ids, **kw)
    model = sparseferry.load(folder, memory_budget=budgets(folder)["all-streamed"])
    try:
        torch.manual_seed(7)
        got = model.generate(ids, **kw)
    finally:
        model.sparseferry.close()
    assert torch.equal(got, want)


def test_dense_checkpoint_streams_like_a_sparse_one(tmp_path):
    folder, ref = make_checkpoint("llama", tmp_path, dtype=torch.float32, layers=3, sparsity=None)
    ckpt = open_checkpoint(folder)
    assert all(t.encoding == "dense" for t in ckpt.tensors.values())
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(5))
    model = sparseferry.load(folder, memory_budget=budgets(folder)["all-streamed"])
    try:
        torch.testing.assert_close(oracle_logits(model, ids), oracle_logits(ref, ids), atol=1e-5, rtol=1e-5)
    finally:
        model.sparseferry.close()


def test_plan_fills_the_budget_resident_first(tmp_path):
    folder, _ = make_checkpoint("llama", tmp_path, layers=6)
    ckpt = open_checkpoint(folder)
    b = budgets(folder)
    b["all-streamed"] = make_plan(ckpt, None).minimum_bytes  # planned without on-demand embeddings
    layer = ckpt.stored_bytes(ckpt.layer_tensors(0))
    b["mixed"] = b["all-streamed"] + 3 * layer + 4096
    assert make_plan(ckpt, None).tiers == ("dense",) * 6
    streamed = make_plan(ckpt, b["all-streamed"])
    assert streamed.tiers == ("disk",) * 6 and streamed.device_bytes <= b["all-streamed"]
    assert streamed.nreadbufs == 1  # the minimum: one layer read at a time
    # room for one more layer's bytes: a second read buffer (the next layer reads while one computes)
    # before a resident layer (one layer fewer to read)
    double = make_plan(ckpt, b["all-streamed"] + layer + 4096)
    assert double.nreadbufs == 2 and double.tiers == ("disk",) * 6 and double.device_bytes <= b["all-streamed"] + layer + 4096
    mixed = make_plan(ckpt, b["mixed"])
    assert mixed.device_bytes <= b["mixed"] and mixed.nreadbufs == 2
    assert sum(t in ("dense", "compressed") for t in mixed.tiers) >= 2
    # resident layers are spread over the stack, not bunched: no two streamed runs differ by more than one
    resident = [i for i, t in enumerate(mixed.tiers) if t in ("dense", "compressed")]
    gaps = [b - a - 1 for a, b in zip([-1] + resident, resident + [len(mixed.tiers)])]
    assert max(gaps) - min(gaps) <= 1 or len(resident) == len(mixed.tiers), mixed.tiers


def test_resident_layers_are_spread_evenly_so_each_read_overlaps_compute():
    from sparseferry.runtime.plan import resident_order

    assert resident_order([10] * 22, 80)[:8] == [1, 4, 6, 9, 12, 15, 17, 20]
    assert resident_order([10] * 6, 20)[:2] == [1, 4]
    assert resident_order([10] * 6, 100) == list(range(6))  # all fit: layer order
    assert resident_order([10] * 6, 5) == list(range(6))  # none fit
    assert sorted(resident_order([5, 30, 10, 10], 25)) == [0, 1, 2, 3]  # unequal sizes: every layer offered


def test_budget_strings_parse():
    assert parse_budget("4GiB") == 4 * 2**30
    assert parse_budget("512MB") == 512 * 10**6
    assert parse_budget("1.5 G") == 1_500_000_000
    assert parse_budget("30%", total_bytes=1000) == 300
    assert parse_budget(12345) == 12345
    assert parse_budget(None) is None
    for bad in ("lots", "12XB", "-3GB", "0", "150%", ""):
        with pytest.raises(BudgetError, match="budget"):
            parse_budget(bad, total_bytes=1000)


def test_budget_below_minimum_states_the_minimum(tmp_path):
    folder, _ = make_checkpoint("llama", tmp_path, layers=2)
    minimum = minimum_budget(folder)
    with pytest.raises(BudgetError, match=r"below the minimum") as e:
        sparseferry.load(folder, memory_budget=minimum - 1)
    from sparseferry.runtime import format_bytes

    assert format_bytes(minimum) in str(e.value) and e.value.minimum_bytes == minimum
    model = sparseferry.load(folder, memory_budget=minimum)  # and the minimum itself works
    assert model.sparseferry.plan.device_bytes <= minimum
    model.sparseferry.close()


def test_untied_input_embeddings_are_read_by_row_under_a_budget(tmp_path):
    folder, ref = make_checkpoint("llama", tmp_path, dtype=torch.float32, layers=2)
    ckpt = open_checkpoint(folder)
    emb = "model.embed_tokens.weight"
    on = sparseferry.load(folder, memory_budget=minimum_budget(folder))
    off = sparseferry.load(folder, memory_budget=minimum_budget(folder, embeddings_on_demand=False),
                           embeddings_on_demand=False)
    try:
        from sparseferry.runtime.placeholders import StreamedWeight
        assert isinstance(on.get_input_embeddings().weight, StreamedWeight)  # not held: a placeholder
        assert off.sparseferry.plan.fixed_bytes - on.sparseferry.plan.fixed_bytes == ckpt.tensors[emb].dense_bytes
        ids = torch.tensor([[5, 3, 5, 259, 0, 3]])
        torch.testing.assert_close(oracle_logits(on, ids), oracle_logits(ref, ids), atol=1e-5, rtol=1e-5)
        assert on.device == torch.device("cpu") and on.dtype == torch.float32
    finally:
        on.sparseferry.close()
        off.sparseferry.close()
    tied_folder, _ = make_checkpoint("opt", tmp_path, layers=2)  # tied to lm_head: stays resident
    tied = sparseferry.load(tied_folder, memory_budget=minimum_budget(tied_folder))
    assert tied.get_input_embeddings().weight.numel() > 0
    tied.sparseferry.close()


def test_not_a_checkpoint_suggests_convert(tmp_path):
    from conftest import make_tiny_model

    folder, _ = make_tiny_model("llama", tmp_path)
    with pytest.raises(CheckpointError, match="sparseferry convert"):
        sparseferry.load(folder)


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    folder, _ = make_checkpoint("llama", tmp_path, layers=2)
    with pytest.raises(RuntimeLoadError, match="CUDA is not available"):
        sparseferry.load(folder, device="cuda")


def test_unknown_architecture_is_a_clear_error(tmp_path):
    folder, _ = make_checkpoint("llama", tmp_path, layers=2)
    m = json.loads((folder / "sparseferry.json").read_text())
    m["config"]["model_type"] = "no-such-model"
    (folder / "sparseferry.json").write_text(json.dumps(seal(m)))
    with pytest.raises(sparseferry.SparseferryError, match="no-such-model"):
        sparseferry.load(folder)


def test_corrupt_layer_met_while_streaming_stops_with_the_layer_name(tmp_path):
    folder, _ = make_checkpoint("llama", tmp_path, dtype=torch.float32, layers=3)
    model = sparseferry.load(folder, memory_budget=budgets(folder)["all-streamed"])
    try:
        ckpt = open_checkpoint(folder)
        path, start, end = ckpt.layer_range(1)
        with open(path, "r+b") as f:  # flip one byte in the middle of layer 1's data, after load
            f.seek((start + end) // 2)
            b = f.read(1)
            f.seek((start + end) // 2)
            f.write(bytes([b[0] ^ 0xFF]))
        for ids in (torch.randint(0, 256, (1, 4)), torch.randint(0, 256, (1, 20))):  # fused and dense modes
            with pytest.raises(CheckpointError, match=r"layer-00001.*checksum mismatch in layer 1"):
                with torch.no_grad():
                    model(ids)
    finally:
        model.sparseferry.close()


def test_generate_cli_prints_text_and_summary(tmp_path, capsys):
    from sparseferry.cli import main

    folder, _ = make_checkpoint("llama", tmp_path, layers=2)
    b = budgets(folder)["all-streamed"]
    assert main(["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "5", "--budget", str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decode_steps"] == 4 and out["plan"]["disk"] == 2 and len(out["texts"]) == 1
    assert {"prefill_s", "decode_tokens_per_s", "bytes_read_per_token", "io_wait_s", "decompress_s", "compute_s",
            "peak_rss_bytes"} <= set(out)
    assert main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "3", "--budget", "1KB"]) == 1
    assert "below the minimum" in capsys.readouterr().err


# What the process may hold beyond the weight budget: activations and KV cache of this short
# generation, allocator slack, and per-forward Python objects (documented in README, "Memory").
ACTIVATION_ALLOWANCE = 16 * 2**20


def test_peak_rss_stays_under_budget_plus_allowance(tmp_path):
    folder, _ = make_checkpoint("llama", tmp_path, hidden=512, layers=16, tokenizer=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder), "30%"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["before"]
    assert r["dense"] > 2 * (r["budget"] + ACTIVATION_ALLOWANCE), "model too small for the test to mean anything"
    assert grown <= r["budget"] + ACTIVATION_ALLOWANCE, (
        f"RSS grew by {grown / 2**20:.1f} MiB, budget {r['budget'] / 2**20:.1f} MiB + allowance "
        f"{ACTIVATION_ALLOWANCE / 2**20:.0f} MiB ({r['plan']})")


def test_ctrl_c_during_generation_exits_130_without_a_traceback(tmp_path):
    import signal
    import time

    folder, _ = make_checkpoint("llama", tmp_path, layers=4, max_position_embeddings=8192)
    b = budgets(folder)["all-streamed"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "sparseferry.cli", "generate", str(folder), "--prompt", "hello",
                             "--max-new-tokens", "6000", "--budget", str(b)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until the plan is printed: generation is under way
            line = proc.stderr.readline()
            if line.startswith("[budget") or not line:
                break
        time.sleep(1.0)
        assert proc.poll() is None, "generation finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)  # no hang
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted" in err


def test_views_of_resident_layers_are_made_once_and_disk_layers_at_every_use(tmp_path, monkeypatch):
    """A layer held in memory compressed is wrapped in its views once, not at every forward pass
    (that would be Python work beside the compute); a layer read from the disk gets fresh views of
    each read (and its checksum verified) every time."""
    from sparseferry.store import Checkpoint

    folder, _ = make_checkpoint("llama", tmp_path, dtype=torch.float32, layers=3)
    calls: dict[int, int] = {}
    real = Checkpoint.layer_views

    def counting(self, i, data, verify=True):
        calls[i] = calls.get(i, 0) + 1
        return real(self, i, data, verify=verify)

    monkeypatch.setattr(Checkpoint, "layer_views", counting)
    for storage, budget in (("host", budgets(folder)["all-streamed"]), ("disk", budgets(folder)["all-streamed"])):
        calls.clear()
        model = sparseferry.load(folder, memory_budget=budget, storage=storage)
        try:
            with torch.no_grad():
                model(torch.randint(0, 256, (1, 4)))
                first = dict(calls)
                for _ in range(3):
                    model(torch.randint(0, 256, (1, 4)))
        finally:
            model.sparseferry.close()
        streamed = model.sparseferry.plan.streamed
        assert streamed, storage
        for i in streamed:
            if storage == "host":
                assert calls[i] == first[i], (i, first, calls)
            else:  # every pass reads every layer again (and may already have read ahead into the next)
                assert calls[i] >= 4, (i, first, calls)  # four passes


@pytest.mark.parametrize("slow_half_gemm", [True, False])
def test_prompts_wider_than_the_fused_kernel_multiply_through_linear_wide(tmp_path, monkeypatch, slow_half_gemm):
    """Beyond MATVEC_MAX_BATCH rows a layer's compressed matrix is decompressed into the scratch buffer
    and multiplied by `kernels.linear_wide` (fp32 where this CPU's bf16 GEMM is slow, torch's linear
    elsewhere); the logits stay transformers' within bf16 rounding either way."""
    import sparseferry.kernels as K

    folder, model = make_checkpoint("llama", tmp_path, layers=2)
    monkeypatch.setitem(K.SLOW_HALF_GEMM, torch.bfloat16, slow_half_gemm)
    shapes, wide = [], K.linear_wide
    monkeypatch.setattr(K, "linear_wide", lambda x, w, bias=None: shapes.append(tuple(w.shape)) or wide(x, w, bias))
    ids = torch.randint(0, 256, (1, K.MATVEC_MAX_BATCH + 5), generator=torch.Generator().manual_seed(0))
    m = sparseferry.load(folder)
    try:
        with torch.no_grad():
            got = m(input_ids=ids).logits
    finally:
        m.sparseferry.close()
    inter = model.config.intermediate_size
    assert (inter, model.config.hidden_size) in shapes  # a layer's MLP matrix, not only the output head
    with torch.no_grad():
        torch.testing.assert_close(got, model(input_ids=ids).logits, rtol=2e-2, atol=2e-2)


def test_the_allowance_counts_one_wide_matmul_in_fp32():
    from sparseferry.runtime.allowance import allowance

    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
           "vocab_size": 100}
    act = allowance(cfg, batch=2, prompt_tokens=50, new_tokens=1)["activations"]
    bf16_only = 2 * 50 * (6 * 64 + 3 * 64 + 3 * 256) * 2 + 2 * 4 * 50 * 50 * 4
    assert act == bf16_only + 2 * 50 * 2 * 256 * 4 + (4 << 20)


def test_with_every_layer_resident_the_cpu_pipeline_runs_no_threads(tmp_path):
    """Compressed resident layers need nothing read ahead: acquire hands out their views, no thread
    wakes at each layer; with layers on disk the reader and decompressor run as before."""
    folder, model = make_checkpoint("llama", tmp_path)
    ids = torch.randint(0, 250, (1, 6), generator=torch.Generator().manual_seed(0))
    want = oracle_logits(model, ids)
    for budget, direct in ((None, True), (budgets(folder)["mixed"], False)):
        m = sparseferry.load(folder, memory_budget=budget, storage="disk")
        try:
            p = m.sparseferry.pipeline
            got = oracle_logits(m, ids)
            assert p.direct is direct and bool(p.threads) is not direct
            assert p.stats.uses == len(m.sparseferry.plan.streamed)
            assert (got.float() - want.float()).abs().max() <= 3e-2 * want.float().abs().max()
        finally:
            m.sparseferry.close()
