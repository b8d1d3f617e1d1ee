"""What a loaded model says about weights it does not hold.

A streamed layer's weights are in memory only while its forward runs (views of a read buffer, a
slot or the scratch matrix, all reused by the next layer). Between uses its parameters are
`StreamedWeight` placeholders: tensors that answer questions about their metadata (shape,
dtype, device, ...; backed by a single element) and raise `StreamedWeightError` for anything that would need their values. So
`named_parameters()` / `parameters()` list every parameter, with true shapes; `state_dict()` and
`save_pretrained()` of a model with streamed layers raise that error too, saying where the true
weights are, instead of returning another matrix's values. After `close()`, any forward raises
`ModelClosedError`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SparseferryError


class StreamedWeightError(SparseferryError):
    """The values of a weight that streams from a checkpoint were asked for outside its layer's forward."""


class ModelClosedError(SparseferryError):
    """A model was used after `model.sparseferry.close()`."""


def _hint(path) -> str:
    return (f"its weights stream from {path} and are not held in memory; read them with "
            f"sparseferry.open_checkpoint({str(path)!r}).load(name), or use the HuggingFace folder it was converted from")


# metadata a placeholder answers (no values needed)
_META_OK = {"__get__", "__repr__", "__format__", "size", "dim", "numel", "element_size", "stride", "is_floating_point",
            "is_complex", "is_contiguous", "requires_grad_", "__len__", "nelement", "ndimension", "__hash__",
            "detach", "__reduce_ex__", "__deepcopy__"}


class StreamedWeight(torch.Tensor):
    """A tensor standing for a streamed weight: metadata only; any computation on it raises StreamedWeightError."""

    _sf_name: str = "?"
    _sf_path: str = "?"

    @staticmethod
    def make(shape, dtype: torch.dtype, device, name: str, path) -> "StreamedWeight":
        """Of `shape` on `device` (so model.device and model.dtype tell the truth), backed by one element."""
        base = torch.zeros((1,) * len(shape), dtype=dtype, device=device).expand(*shape)
        t = torch.Tensor._make_subclass(StreamedWeight, base)
        t._sf_name, t._sf_path = name, str(path)
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _META_OK:
            return super().__torch_function__(func, types, args, kwargs or {})
        me = next((a for a in args if isinstance(a, StreamedWeight)), None)
        why = getattr(me, "_sf_why", None) or _hint(getattr(me, "_sf_path", "?"))
        raise StreamedWeightError(f"{getattr(me, '_sf_name', 'a weight')}: {name or func!s} needs its values, but {why}")


def install(engine) -> None:
    """Placeholders for every streamed layer's parameters; state_dict / save_pretrained refuse clearly."""
    ckpt, model = engine.ckpt, engine.model
    engine.placeholders = {}
    for i in engine.plan.streamed:
        layer = engine.layers[i]
        held = {}
        for rel, p in list(layer.named_parameters(recurse=True)):
            full = f"{ckpt.layers_prefix}.{i}.{rel}"
            if full in getattr(engine, "pinned", ()):
                continue  # held resident inside a streamed layer (a router kept for expert read-ahead)
            mod_name, _, leaf = rel.rpartition(".")
            mod = layer.get_submodule(mod_name) if mod_name else layer
            ph = _placeholder(p.shape, p.dtype, engine.device, full, ckpt.path)
            mod._parameters[leaf] = ph
            held[rel] = (mod, leaf, ph)
        engine.placeholders[i] = held
        layer.register_state_dict_pre_hook(_refuse_state_dict(engine, f"layer {i} (of {len(engine.plan.streamed)} "
                                                                           f"streamed layers) is streamed"))
    emb = model.get_input_embeddings()
    rows = getattr(emb, "_sf_rows", None)
    if rows is not None:  # read by row from the file: the table is not in memory either
        emb._parameters["weight"] = _placeholder((rows.rows, rows.cols), rows.dtype, engine.device, rows.name, ckpt.path)
        emb.register_state_dict_pre_hook(_refuse_state_dict(engine, "the input embeddings are read by row"))
    head = model.get_output_embeddings()
    held_head = head is not None and head.__dict__.get("_sf_head") is not None
    if held_head:
        head.register_state_dict_pre_hook(_refuse_state_dict(engine, "the output head is held in its stored "
                                                                     "(quantized) form"))
    if engine.plan.streamed or rows is not None or held_head:
        model.save_pretrained = _refuse_save(engine)


def _placeholder(shape, dtype, device, name: str, path) -> nn.Parameter:
    ph = nn.Parameter(StreamedWeight.make(tuple(shape), dtype, device, name, path), requires_grad=False)
    ph._sf_name, ph._sf_path = name, str(path)
    return ph


def held_compressed(shape, dtype, device, name: str, path) -> nn.Parameter:
    """The placeholder of a weight `load` holds in its stored form (the quantized output head)."""
    ph = _placeholder(shape, dtype, device, name, path)
    ph._sf_why = (f"it is held in its stored form (quantized values) and multiplied from it; read it "
                                    f"with sparseferry.open_checkpoint({str(path)!r}).load({name!r})")
    return ph


def restore(engine, i: int) -> None:
    """After layer i's forward: its parameters are placeholders again, its compressed views dropped."""
    for mod, leaf, ph in engine.placeholders.get(i, {}).values():
        mod._parameters[leaf] = ph
        if mod.__dict__.get("_sf_bitmap") is not None:
            mod.__dict__["_sf_bitmap"] = None


def _refuse_state_dict(engine, what: str):
    def hook(module, prefix, keep_vars):  # noqa: ARG001 - torch's hook signature
        raise StreamedWeightError(f"state_dict(): {what}: {_hint(engine.ckpt.path)}")

    return hook


def _refuse_save(engine):
    def save_pretrained(*args, **kwargs):  # noqa: ARG001
        raise StreamedWeightError(f"save_pretrained(): {len(engine.plan.streamed)} decoder layers of this model are "
                                  f"streamed (or its embeddings read by row), so it cannot write them: "
                                  f"{_hint(engine.ckpt.path)}")

    return save_pretrained


def refuse_when_closed(engine):
    """A forward pre-hook for a closed engine's model."""
    def hook(module, args, kwargs):  # noqa: ARG001
        raise ModelClosedError(f"this model was closed (model.sparseferry.close()); load {engine.ckpt.path} again to use it")

    return hook


__all__ = ["ModelClosedError", "StreamedWeight", "StreamedWeightError", "held_compressed", "install", "refuse_when_closed",
           "restore"]
