"""What a `from_pretrained` user types, mapped onto `sparseferry.load`'s own options.

`load` accepts the keywords of transformers' `from_pretrained` / Accelerate's big-model loading that
mean something here and refuses the others by name, saying what sparseferry does instead:

    dtype / torch_dtype     checked against the stored dtype ("auto" or None: the stored one)
    device_map              one device ("cpu", "cuda", "cuda:1", 0, {"": "cuda:0"}, "auto") -> device
    max_memory              {device: size} for the compute device -> memory_budget; on CUDA a "cpu"
                            entry -> storage="host" (streamed layers in host RAM, as Accelerate would)
    low_cpu_mem_usage       accepted: loading is always lazy, layer by layer
    trust_remote_code       False accepted; True refused (only transformers' own model code runs)
    use_safetensors         True / None accepted (checkpoints are safetensors)
    attn_implementation     passed through (a `load` option of its own)

A name that is not a path on disk but looks like a Hugging Face Hub id ("org/model") gets a message
saying that sparseferry never downloads, and what to run instead.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import SparseferryError


class UnsupportedOptionError(SparseferryError, TypeError):
    """A `from_pretrained` keyword with no meaning in sparseferry (the message names the equivalent)."""


class HubIdError(SparseferryError):
    """A Hugging Face Hub id was given where a local folder is needed."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

_DOWNLOAD = ("sparseferry reads local folders only and never downloads: fetch the model first "
             "(`huggingface-cli download ORG/MODEL --local-dir DIR`), then `sparseferry convert DIR CKPT` "
             "(or `sparseferry prune`) and load CKPT")
_REFUSED = {
    "offload_folder": "streamed layers are read from the checkpoint's own files (storage='disk'); there is no offload folder",
    "offload_state_dict": "loading is always layer by layer; there is no state dict to offload",
    "offload_buffers": "buffers are small and always held on the device",
    "quantization_config": "quantize at conversion time: `sparseferry convert --values int8|int4`",
    "load_in_8bit": "quantize at conversion time: `sparseferry convert --values int8`",
    "load_in_4bit": "quantize at conversion time: `sparseferry convert --values int4`",
    "revision": _DOWNLOAD, "token": _DOWNLOAD, "use_auth_token": _DOWNLOAD, "cache_dir": _DOWNLOAD,
    "force_download": _DOWNLOAD, "local_files_only": _DOWNLOAD, "proxies": _DOWNLOAD, "resume_download": _DOWNLOAD,
    "subfolder": "pass the checkpoint folder itself as the path",
    "variant": "a checkpoint has one set of weights; convert the variant you want",
    "config": "the model is built from the config stored in the checkpoint",
    "state_dict": "weights come from the checkpoint files; convert a folder holding them",
    "output_loading_info": "a checkpoint that lacks weights is refused at load; nothing is missing or unexpected",
    "tp_plan": "sparseferry runs on one device", "tp_size": "sparseferry runs on one device",
    "gguf_file": "export the GGUF to a HuggingFace folder first, then `sparseferry convert` it",
}
_MULTI = ("auto", "balanced", "balanced_low_0", "sequential")


def check_local_path(path) -> None:
    """Raise HubIdError when `path` does not exist but has the shape of a Hub id."""
    p = Path(path)
    if p.exists():
        return
    s = str(path)
    if _HUB_ID.match(s) and not s.startswith("."):
        raise HubIdError(f"{s!r} is not a folder here; it looks like a Hugging Face Hub id. {_DOWNLOAD.replace('ORG/MODEL', s)}")


def _as_device(d) -> str:
    if isinstance(d, int) and not isinstance(d, bool):
        return f"cuda:{d}"
    if isinstance(d, torch.device):
        return str(d)
    if isinstance(d, str) and d in ("cpu", "cuda", "mps", "disk", "meta") or isinstance(d, str) and re.match(r"^cuda:\d+$", d):
        return d
    if isinstance(d, str) and d.isdigit():
        return f"cuda:{d}"
    raise UnsupportedOptionError(f"device_map / max_memory device {d!r}: expected 'cpu', 'cuda', 'cuda:N' or a GPU index")


def _same(a: str, b: str) -> bool:
    norm = lambda s: "cuda:0" if s == "cuda" else s  # noqa: E731
    return norm(a) == norm(b)


def from_pretrained_options(kwargs: dict, *, device, memory_budget, storage: str, stored_dtype) -> dict:
    """`load`'s device, memory_budget, storage (and attn_implementation) after the `from_pretrained` keywords.

    `stored_dtype` is a callable returning the checkpoint's dtype (opened only if a dtype is given).
    Raises UnsupportedOptionError naming the keyword and the sparseferry equivalent; a TypeError for
    a keyword `from_pretrained` does not have either.
    """
    kw = dict(kwargs)
    out = {"device": device, "memory_budget": memory_budget, "storage": storage}
    for name in list(kw):
        if name in _REFUSED:
            raise UnsupportedOptionError(f"load(): {name}= is not supported: {_REFUSED[name]}")
    for name in ("dtype", "torch_dtype"):
        if name in kw:
            _check_dtype(name, kw.pop(name), stored_dtype)
    if "low_cpu_mem_usage" in kw:
        kw.pop("low_cpu_mem_usage")
    if kw.pop("trust_remote_code", False):
        raise UnsupportedOptionError("load(): trust_remote_code=True is not supported: sparseferry runs only the model code "
                                     "that ships with transformers and never executes code from a checkpoint")
    if kw.get("use_safetensors", True) is False:
        raise UnsupportedOptionError("load(): use_safetensors=False is not supported: checkpoints are safetensors files")
    kw.pop("use_safetensors", None)
    dm = kw.pop("device_map", None)
    if dm is not None:
        out["device"] = _device_from_map(dm, kw.get("max_memory"), device)
    mm = kw.pop("max_memory", None)
    if mm is not None:
        out.update(_budget_from_max_memory(mm, out["device"], memory_budget, storage))
    if "attn_implementation" in kw:
        out["attn_implementation"] = kw.pop("attn_implementation")
    if kw:
        raise TypeError(f"load() got unexpected keyword argument(s): {', '.join(sorted(kw))}")
    return out


def _check_dtype(name: str, value, stored_dtype) -> None:
    if value is None or value == "auto":
        return
    want = value if isinstance(value, torch.dtype) else getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(want, torch.dtype):
        raise UnsupportedOptionError(f"load(): {name}={value!r} is not a torch dtype")
    have = stored_dtype()
    if want != have:
        raise UnsupportedOptionError(
            f"load(): {name}={value!r} but the checkpoint stores {str(have).removeprefix('torch.')}: sparseferry computes in "
            f"the stored dtype; convert again with `sparseferry convert --dtype {str(want).removeprefix('torch.')}`")


def _device_from_map(dm, max_memory, device) -> str:
    if isinstance(dm, dict):
        devs = {_as_device(v) for v in dm.values()}
        if len(devs) != 1:
            raise UnsupportedOptionError(f"load(): device_map with several devices {sorted(devs)} is not supported: sparseferry "
                                         "keeps what fits under memory_budget on one device and streams the rest "
                                         "(device='cuda', memory_budget='4GiB')")
        d = devs.pop()
    elif isinstance(dm, str) and dm in _MULTI:
        gpus = [k for k in (max_memory or {}) if _as_device(k).startswith("cuda")]
        if len(gpus) > 1:
            raise UnsupportedOptionError(f"load(): device_map={dm!r} with max_memory for several GPUs: sparseferry runs on one "
                                         "device; pass device='cuda:N' and memory_budget")
        d = _as_device(gpus[0]) if gpus else ("cuda" if torch.cuda.is_available() else "cpu")
    else:
        d = _as_device(dm)
    if d in ("disk", "meta", "mps"):
        raise UnsupportedOptionError(f"load(): device_map {dm!r}: sparseferry computes on 'cpu' or 'cuda' (layers that do not "
                                     "fit are streamed from disk by itself: storage='disk')")
    if device not in (None, "cpu") and not _same(str(device), d):
        raise UnsupportedOptionError(f"load(): device={device!r} and device_map={dm!r} disagree; pass one of them")
    return d


def _budget_from_max_memory(mm, device: str, memory_budget, storage: str) -> dict:
    if not isinstance(mm, dict) or not mm:
        raise UnsupportedOptionError(f"load(): max_memory={mm!r}: expected a dict such as {{0: '4GiB', 'cpu': '30GiB'}}")
    if memory_budget is not None:
        raise UnsupportedOptionError("load(): max_memory and memory_budget both given; pass one of them")
    entries = {_as_device(k): v for k, v in mm.items()}
    dev = "cuda:0" if device == "cuda" else str(device)
    mine = [v for k, v in entries.items() if _same(k, dev)]
    if not mine:
        raise UnsupportedOptionError(f"load(): max_memory names {sorted(entries)} but the model runs on {dev!r}: "
                                     f"give the budget of {dev!r} (or memory_budget=)")
    others = {k for k in entries if not _same(k, dev)}
    if others - {"cpu", "disk"}:
        raise UnsupportedOptionError(f"load(): max_memory for several compute devices {sorted(entries)} is not supported: "
                                     "sparseferry runs on one device (memory_budget= for it)")
    res = {"memory_budget": mine[0]}
    if dev.startswith("cuda") and "cpu" in entries:
        res["storage"] = "host"  # Accelerate keeps what the GPU cannot hold in CPU RAM
    return res


__all__ = ["HubIdError", "UnsupportedOptionError", "check_local_path", "from_pretrained_options"]
