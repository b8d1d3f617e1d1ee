"""compressed-tensors "sparse-24-bitmask" checkpoints: imported (scattered to dense, stored as our bitmap),
or refused naming the tensor. The layout is built here with numpy from its description
(sparseferry/sparse24.py); tests/test_export.py also imports one written by compressed-tensors itself."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_bit_equal, assert_nothing_written, make_tiny_model
from safetensors.torch import save_file

import sparseferry
from sparseferry.convert import ConvertError, convert
from sparseferry.store import open_checkpoint


def keep_2_of_4_(model) -> list[str]:
    """Keep the 2 largest |w| of every 4 in each decoder linear weight (+0.0 elsewhere); their module names."""
    names = []
    for name, p in model.named_parameters():
        if ".layers." in name and name.endswith("_proj.weight"):
            w = p.data.view(p.shape[0], -1, 4)
            mask = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.abs().topk(2, dim=-1).indices, True)
            p.data.copy_(w.masked_fill(~mask, 0).view_as(p))
            names.append(name.removesuffix(".weight"))
    return names


def write_sparse24(folder, model, modules, *, bad: str | None = None) -> None:
    """A sparse-24-bitmask checkpoint of `model` (bad="bitmask": one group keeps 3 of 4)."""
    tensors = {}
    for name, t in model.state_dict().items():
        p = name.removesuffix(".weight")
        if p not in modules:
            tensors[name] = t.contiguous()
            continue
        rows, cols = t.shape
        mask = (t != 0).numpy()
        if bad == "bitmask" and p == modules[0]:
            mask[0, :4] = [True, True, True, False]
        tensors[f"{p}.shape"] = torch.tensor([[rows], [cols]], dtype=torch.int64)
        tensors[f"{p}.compressed"] = t[torch.from_numpy(mask)][: rows * cols // 2].reshape(rows, cols // 2).contiguous()
        tensors[f"{p}.bitmask"] = torch.from_numpy(np.packbits(mask, axis=-1, bitorder="little"))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "version": "0.14.0.1", "transform_config": {},
                                  "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                                                      "targets": ["Linear"], "ignore": ["lm_head"], "global_sparsity": 0.4}}
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_sparse_24_bitmask_checkpoint_imports_bit_exactly_and_runs(tmp_path):
    src, model = make_tiny_model("llama", tmp_path, sparsity=None)
    modules = keep_2_of_4_(model)
    write_sparse24(src, model, modules)
    dst = tmp_path / "ckpt"
    convert(src, dst, progress=False)
    ckpt = open_checkpoint(dst)
    for name, p in model.state_dict().items():
        if name in ckpt.tensors:
            assert_bit_equal(ckpt.load(name), p, name)
    assert ckpt.tensors[f"{modules[0]}.weight"].encoding == "bitmap"
    ids = torch.tensor([[256, 10, 20, 30, 40]])
    loaded = sparseferry.load(dst, resident_form="dense")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    loaded.sparseferry.close()


def test_a_sparse_24_tensor_that_is_not_2_of_4_is_refused_by_name(tmp_path):
    src, model = make_tiny_model("llama", tmp_path, sparsity=None)
    modules = keep_2_of_4_(model)
    write_sparse24(src, model, modules, bad="bitmask")
    with pytest.raises(ConvertError, match=rf"{modules[0]}\.bitmask: row 0 does not keep exactly 2 of every 4"):
        convert(src, tmp_path / "ckpt", progress=False)
    assert_nothing_written(tmp_path / "ckpt")
