"""The fast CPU encoder is the reference encoder, only faster: same parts, bit for bit."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseferry.encoder import encode_fast
from sparseferry.format import encode


def same(a, b):
    assert a.shape == b.shape
    for name, t in a.parts().items():
        u = b.parts()[name]
        assert t.dtype == u.dtype and t.shape == u.shape, name
        if t.numel():
            assert torch.equal(t.contiguous().view(torch.uint8), u.contiguous().view(torch.uint8)), name
    assert torch.equal(a.block_offsets, b.block_offsets)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), cols=st.sampled_from([1, 7, 8, 9, 63, 1023, 1024, 1025, 2049, 3000]),
       sparsity=st.sampled_from([0.0, 0.01, 0.5, 0.9, 0.999, 1.0]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), seed=st.integers(0, 2**16))
def test_fast_encoder_equals_the_reference(rows, cols, sparsity, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    same(encode_fast(w), encode(w))


def test_special_values_match_the_reference():
    w = torch.tensor([[float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1e-40, -1.0, 0.0, 2.0]], dtype=torch.float32)
    same(encode_fast(w), encode(w))
    for dt in (torch.bfloat16, torch.float16):
        same(encode_fast(w.to(dt)), encode(w.to(dt)))


def test_non_contiguous_input_is_encoded_by_value():
    w = torch.randn(64, 32).to(torch.bfloat16).t()
    same(encode_fast(w), encode(w.contiguous()))


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.int8)])
def test_bad_input_raises_like_the_reference(bad):
    from sparseferry.format import FormatError

    with pytest.raises(FormatError):
        encode_fast(bad)
