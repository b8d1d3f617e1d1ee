"""The one layer-sequential calibration loop's pieces: capture the inputs of decoder layer 0, run a
layer on every sample, and feed each linear layer's inputs to its pruner.

Layer-sequential (as in the SparseGPT and Wanda reference code): the calibration samples go through
the embeddings once, then through one decoder layer at a time; layer i+1 sees the outputs of the
*pruned* layer i, so later layers are pruned knowing the error of earlier ones. Memory: one layer
plus two activation buffers [nsamples, seqlen, hidden].

Generic over architectures: whatever the model passes to each decoder layer besides the hidden
states (attention mask, position ids or (cos, sin) position embeddings, cache flags...) is recorded
once per layer, from the first sample, and passed again unchanged: layers may differ (sliding-window
and full-attention layers get different masks). All samples have the same length and no padding, so
those extra inputs are the same for every sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..hf import is_linear
from .masks import PruneError


class _Captured(Exception):
    """Raised by the catcher to stop the forward pass once layer 0's inputs are recorded."""


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records its call, then stops the forward pass (`stop`) or hands
    its input hidden states on unchanged (so that the next layer's call is recorded too)."""

    def __init__(self, inner: nn.Module, calls: list, stop: bool = True):
        super().__init__()
        self.inner = inner
        self.calls = calls
        self.stop = stop

    def __getattr__(self, name):  # models may read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.stop:
            raise _Captured
        return args[0] if args else kwargs["hidden_states"]


def _cast(obj, dtype: torch.dtype, memo: dict | None = None):
    """Floating tensors in a nest of tuples/lists/dicts cast to `dtype`; everything else unchanged.
    A tensor met again (the same mask passed to many layers) is cast once (`memo`: id -> cast)."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.detach().to(dtype) if obj.is_floating_point() else obj.detach())
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype, memo) for o in obj)
    if isinstance(obj, list):
        return [_cast(o, dtype, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast(v, dtype, memo) for k, v in obj.items()}
    return obj


@dataclass
class LayerInputs:
    """What decoder layers are called with, for all samples.

    hidden: [nsamples, seqlen, hidden] in the compute dtype; sample j is hidden[j : j + 1].
    args, kwargs: the other arguments of the layer being run (`select`), recorded from the first
        sample, floats in the compute dtype; `per_layer[i]` holds layer i's.
    """

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    per_layer: list | None = None

    def select(self, i: int) -> None:
        """Run layer i next: its own extra arguments."""
        if self.per_layer is not None:
            self.args, self.kwargs = self.per_layer[i]


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, samples: list[torch.Tensor],
                         dtype: torch.dtype = torch.float32) -> LayerInputs:
    """Run `model` on each sample [1, seqlen] up to `layers[0]` and return what that layer receives.

    Only the modules before layer 0 (embeddings, positions, rotary) run; they must hold real weights.
    For the first sample every layer is replaced by a stand-in that records its call and passes the
    hidden states on, to learn each layer's own extra arguments; a model that cannot run that way
    (it computes on the layers' outputs between layers) gives every layer layer 0's.
    """
    lengths = {s.shape[-1] for s in samples}
    if len(lengths) != 1:
        raise PruneError(f"calibration samples must all have the same length, got lengths {sorted(lengths)}")
    originals = list(layers)
    per_layer: list | None = [[] for _ in originals]
    try:
        for k, layer in enumerate(originals):
            layers[k] = _Catcher(layer, per_layer[k], stop=k == len(originals) - 1)
        with torch.no_grad():
            try:
                model(input_ids=samples[0], use_cache=False)
            except _Captured:
                pass
            except Exception:  # noqa: BLE001 - the fallback is layer 0's arguments for all layers
                per_layer = None
    finally:
        for k, layer in enumerate(originals):
            layers[k] = layer
    calls: list = []
    first = layers[0]
    layers[0] = _Catcher(first, calls)
    try:
        with torch.no_grad():
            for ids in samples:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Captured:
                    pass
    finally:
        layers[0] = first
    if len(calls) != len(samples):
        raise PruneError(f"{type(model).__name__}: decoder layer 0 was reached by {len(calls)} of {len(samples)} "
                         "calibration samples (the model does not call its decoder layers in order)")
    hidden = []
    for args, kwargs in calls:
        if args:
            hidden.append(args[0])
        else:
            hidden.append(kwargs["hidden_states"])
    memo: dict = {}

    def extras(call):
        args, kwargs = call
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return _cast(args[1:] if args else (), dtype, memo), _cast(kwargs, dtype, memo)

    args, kwargs = extras(calls[0])
    if per_layer is not None:
        per_layer = [extras(c[0]) if c else (args, kwargs) for c in per_layer]
    return LayerInputs(torch.cat([h.detach().to(dtype) for h in hidden]), args, kwargs, per_layer)


def run_layer(layer: nn.Module, inputs: LayerInputs, out: torch.Tensor, on_output=None) -> None:
    """out[j] = layer(sample j) for every sample; `on_output(j, y)` sees each output [1, seqlen, hidden]
    before it is stored (e.g. to compare with the previous contents of `out`). `out` may be `inputs.hidden`
    only if no one needs the inputs afterwards."""
    with torch.no_grad():
        for j in range(inputs.hidden.shape[0]):
            y = layer(inputs.hidden[j : j + 1], *inputs.args, **inputs.kwargs)
            if isinstance(y, (tuple, list)):
                y = y[0]
            if on_output is not None:
                on_output(j, y)
            out[j : j + 1] = y


def linear_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """{qualified name inside the layer: module} of its linear layers (nn.Linear, GPT-2's Conv1D)."""
    return {name: mod for name, mod in layer.named_modules() if is_linear(mod)}


def scoring_weight(mod: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a view): Conv1D stores it as [in, out]."""
    return mod.weight if isinstance(mod, nn.Linear) else mod.weight.T


def collect_statistics(layer: nn.Module, pruners: dict[str, object], inputs: LayerInputs, out: torch.Tensor) -> None:
    """Run the (unpruned) layer on every sample, feeding each linear's inputs to `pruners[name].add_batch`;
    the layer outputs are stored in `out`."""
    mods = linear_modules(layer)
    handles = []
    for name, pruner in pruners.items():
        def hook(_mod, args, _out, pruner=pruner):
            pruner.add_batch(args[0].detach())

        handles.append(mods[name].register_forward_hook(hook))
    try:
        run_layer(layer, inputs, out)
    finally:
        for h in handles:
            h.remove()
