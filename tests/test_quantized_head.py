"""An output head stored with quantized values (`convert --encode-lm-head --values int8|int4`) is held
in that form on the CPU and multiplied by the fused kernel, not decoded to a dense bf16 copy."""
from __future__ import annotations

import pytest
import torch

import sparseferry
from sparseferry.convert import convert
from sparseferry.kernels import native, sparse_matmul
from sparseferry.runtime.placeholders import StreamedWeightError
from sparseferry.store import open_checkpoint

from conftest import make_tiny_model

pytestmark = pytest.mark.skipif(native._native is None, reason=f"native kernels not built: {native.LOAD_ERROR}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("head")
    src, model = make_tiny_model("llama", d, hidden=128)
    out = {"model": model}
    for v in ("int8", "int4"):
        out[v] = d / f"head-{v}"
        convert(src, out[v], values=v, encode_lm_head=True, progress=False)
    out["plain"] = d / "plain-int8"
    convert(src, out["plain"], values="int8", progress=False)
    return out


@pytest.mark.parametrize("values", ["int8", "int4"])
def test_the_head_is_held_as_stored_and_counted_so(folders, values):
    ckpt = open_checkpoint(folders[values])
    e = ckpt.tensors["lm_head.weight"]
    assert e.values == values
    m = sparseferry.load(folders[values])
    try:
        head = m.get_output_embeddings()
        bt = head.__dict__["_sf_head"]
        assert bt.value_format == values and tuple(bt.shape) == e.shape
        plain = sparseferry.load(folders["plain"])
        try:
            assert "_sf_head" not in plain.get_output_embeddings().__dict__
            fixed_plain = plain.sparseferry.plan.fixed_bytes
        finally:
            plain.sparseferry.close()
        assert m.sparseferry.plan.fixed_bytes == fixed_plain - e.dense_bytes + e.stored_bytes
        with pytest.raises(StreamedWeightError, match="held in its stored form"):
            head.weight.sum()
        with pytest.raises(StreamedWeightError):
            m.state_dict()
    finally:
        m.sparseferry.close()


@pytest.mark.parametrize("values", ["int8", "int4"])
def test_its_logits_are_the_fused_kernels_for_any_number_of_rows(folders, values):
    m = sparseferry.load(folders[values])
    ids = torch.randint(0, 250, (3, 7), generator=torch.Generator().manual_seed(0))  # 21 rows: three chunks
    try:
        head = m.get_output_embeddings()
        with torch.no_grad():
            hidden = m.model(input_ids=ids).last_hidden_state
            got = m(input_ids=ids).logits
            want = torch.stack([sparse_matmul(hidden[b, t : t + 1], head._sf_head)[0]
                                for b in range(3) for t in range(7)]).view(3, 7, -1)
        assert torch.equal(got, want)  # row by row or eight at a time: the same kernel, the same numbers
        with torch.no_grad():
            oracle = folders["model"](input_ids=ids).logits.float()
        err = (got.float() - oracle).norm() / oracle.norm()
        assert err < (0.05 if values == "int8" else 0.3)  # the random tiny model's quantization error
    finally:
        m.sparseferry.close()


def test_off_the_fused_path_the_head_is_decoded(folders):
    m = sparseferry.load(folders["int8"], resident_form="dense")
    try:
        head = m.get_output_embeddings()
        assert "_sf_head" not in head.__dict__ and head.weight.dtype == torch.bfloat16
        want = open_checkpoint(folders["int8"]).load("lm_head.weight")
        assert torch.equal(head.weight, want)
    finally:
        m.sparseferry.close()
