"""The RMSNorm `load` gives a model on the CPU: transformers' LlamaRMSNorm in one native call (csrc/norm.c)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from sparseferry.kernels import native
from sparseferry.runtime import norms

pytestmark = pytest.mark.skipif(native._native is None, reason=f"native kernels not built: {native.LOAD_ERROR}")


def norm(cls, h, eps=1e-6, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = cls(h, eps=eps).to(torch.bfloat16)
    n.weight.data = torch.randn(h, generator=g).to(torch.bfloat16)
    return n


def rows(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-4, 4, shape[-2])[:, None]  # rows of very different magnitudes
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("h", [1, 7, 16, 17, 2048, 2049])
@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen3RMSNorm], ids=["llama", "qwen3"])
def test_it_computes_what_transformers_rmsnorm_computes(cls, h):
    n = norm(cls, h, eps=1e-5)
    x = rows(3, 6, h)
    got, want = native.rms_norm_bf16(x, n.weight, 1e-5), n(x)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert norms.agree(got, want)
    assert (got != want).float().mean() < 1e-3  # bit for bit but for a rare bf16 step (the sum's order)


def test_special_values_follow_torch():
    n = norm(LlamaRMSNorm, 8)
    x = rows(4, 8)
    x[0, 3] = float("nan")
    x[1, 2] = float("inf")
    x[2] = 0
    got, want = native.rms_norm_bf16(x, n.weight, 1e-6), n(x)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[2], want[2])
    assert got[0].isnan().all() and torch.equal(got.view(torch.int16)[0], want.view(torch.int16)[0])  # NaN 0x7fc0


def test_empty_rows_and_wrong_inputs():
    n = norm(LlamaRMSNorm, 8)
    assert native.rms_norm_bf16(torch.empty(0, 8, dtype=torch.bfloat16), n.weight, 1e-6).shape == (0, 8)
    for x, w in [(rows(2, 8).float(), n.weight), (rows(2, 8), n.weight.float()), (rows(2, 9), n.weight),
                 (rows(2, 8), torch.zeros(16, dtype=torch.bfloat16)[::2])]:
        with pytest.raises(native.KernelError, match="rms_norm_bf16"):
            native.rms_norm_bf16(x, w, 1e-6)


def test_patched_norms_run_natively_and_keep_their_own_forward_for_other_inputs():
    n = norm(LlamaRMSNorm, 64)
    x = rows(2, 3, 64)
    want = n(x)
    assert norms.patch(n) == 1 and "forward" in n.__dict__
    assert torch.equal(n(x), native.rms_norm_bf16(x, n.weight, n.variance_epsilon)) and n._sf_norm_checked
    assert norms.agree(n(x), want)
    xf = x.float()
    n32 = norm(LlamaRMSNorm, 64).float()
    norms.patch(n32)
    assert torch.equal(n32(xf), n32._sf_norm_forward(xf))  # fp32: the module's own forward
    big = rows(norms.NATIVE_MAX_ELEMENTS // 64 + 1, 64)
    assert torch.equal(n(big), n._sf_norm_forward(big))  # a long prefill: torch's forward, on every thread


class ShiftedRMSNorm(nn.Module):
    """Named like the others, computes something else (Gemma's scale: 1 + weight)."""

    def __init__(self, h, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(h))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def test_a_norm_that_computes_something_else_goes_back_to_its_own_forward():
    n = norm(ShiftedRMSNorm, 32)
    x = rows(2, 32)
    want = n(x)
    assert norms.patch(n) == 1
    assert torch.equal(n(x), want) and "forward" not in n.__dict__  # checked at the first call, then its own
    assert torch.equal(n(x), want)


def test_load_gives_a_bf16_model_native_norms_within_transformers_rounding(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    import sparseferry
    from sparseferry.convert import convert

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "sf", progress=False)
    m = sparseferry.load(tmp_path / "sf")
    try:
        patched = [mod for mod in m.modules() if isinstance(mod, LlamaRMSNorm)]
        assert patched and all("forward" in mod.__dict__ for mod in patched)
        ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            got, want = m(input_ids=ids).logits.float(), model(input_ids=ids).logits.float()
        assert all(mod._sf_norm_checked for mod in patched)
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    finally:
        m.sparseferry.close()
