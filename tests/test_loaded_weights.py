"""What a loaded model says about its weights: true values, or a clear error; never another matrix's bytes.

Streamed layers hold their weights only while their forward runs (views of buffers the next layer
reuses). Between uses their parameters are placeholders that know their shape and dtype and refuse
to give values; `state_dict()` and `save_pretrained()` say where the true weights are; a closed
model says it was closed.
"""
from __future__ import annotations

import pytest
import torch
from conftest import assert_bit_equal, make_checkpoint

import sparseferry
from sparseferry.runtime import BudgetError
from sparseferry.runtime.placeholders import ModelClosedError, StreamedWeightError
from sparseferry.store import open_checkpoint


@pytest.fixture(params=[False, True], ids=["views", "slots"])
def loaded(request, tmp_path):
    folder, ref = make_checkpoint("llama", tmp_path, dtype=torch.float32, layers=3)
    ckpt = open_checkpoint(folder)
    with pytest.raises(BudgetError) as e:
        sparseferry.load(folder, memory_budget=1, slots=request.param)
    budget = e.value.minimum_bytes + ckpt.dense_bytes(ckpt.layer_tensors(0))  # one layer resident, two streamed
    model = sparseferry.load(folder, memory_budget=budget, slots=request.param, resident_form="dense")
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 12)))  # >8 rows: the scratch path too
        model(torch.randint(0, 256, (1, 3)))
    yield folder, ref, model
    model.sparseferry.close()


def test_named_parameters_are_true_weights_or_placeholders_that_refuse_values(loaded):
    folder, ref, model = loaded
    engine = model.sparseferry
    assert engine.plan.streamed, "the test needs streamed layers"
    want = dict(ref.named_parameters())
    prefix = engine.ckpt.layers_prefix
    streamed = {f"{prefix}.{i}." for i in engine.plan.streamed}
    checked = 0
    for name, p in model.named_parameters():
        assert tuple(p.shape) == tuple(want[name].shape) and p.dtype == want[name].dtype, name
        if any(name.startswith(s) for s in streamed) or name == "model.embed_tokens.weight":  # read by row
            with pytest.raises(StreamedWeightError, match=rf"{name}: .* stream from .*open_checkpoint"):
                p.sum()
            with pytest.raises(StreamedWeightError):
                p.cpu()
            checked += 1
        elif p.numel():  # resident weights, embeddings and head: the true values
            assert_bit_equal(p.detach(), want[name].detach(), name)
    assert checked


def test_state_dict_and_save_pretrained_of_a_streamed_model_say_where_the_weights_are(loaded, tmp_path):
    folder, _, model = loaded
    with pytest.raises(StreamedWeightError, match=r"state_dict\(\): (layer \d+ .* streamed|the input embeddings are read by row): .*open_checkpoint"):
        model.state_dict()
    with pytest.raises(StreamedWeightError, match=r"save_pretrained\(\): .* streamed"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert model.sparseferry.ckpt.path == folder


def test_a_fully_resident_dense_model_gives_its_true_state_dict(tmp_path):
    folder, ref = make_checkpoint("llama", tmp_path, dtype=torch.float32, layers=2)
    model = sparseferry.load(folder, resident_form="dense")
    try:
        assert not model.sparseferry.plan.streamed
        sd, want = model.state_dict(), ref.state_dict()
        for k, v in want.items():
            assert_bit_equal(sd[k], v, k)
    finally:
        model.sparseferry.close()


def test_use_after_close_says_the_model_was_closed(loaded):
    _, _, model = loaded
    model.sparseferry.close()
    model.sparseferry.close()  # idempotent
    with pytest.raises(ModelClosedError, match="this model was closed"):
        with torch.no_grad():
            model(torch.randint(0, 256, (1, 4)))
    with pytest.raises(ModelClosedError):
        model.generate(torch.randint(0, 256, (1, 4)), max_new_tokens=2, do_sample=False)
