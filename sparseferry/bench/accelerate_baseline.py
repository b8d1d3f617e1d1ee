"""The baseline: HuggingFace Accelerate offloading, as its users run a model larger than their RAM.

    python -m sparseferry.bench.accelerate_baseline SPEC.json RESULT.json

`transformers.AutoModelForCausalLM.from_pretrained` with an explicit `device_map` that keeps
`budget_bytes` of the (dense-stored) weights in RAM and puts the rest on "disk", and an explicit
`offload_folder` on the same disk. What really happens with safetensors checkpoints (transformers 5):
the disk-offloaded weights are never copied into `offload_folder`; Accelerate's hooks read them from
the checkpoint's own files at every use, through the page cache. So the page cache of the model folder
(and of the offload folder, in case it is used) is emptied before every forward pass when the spec
says `drop_each_pass` (storage "disk"): every decoded token reads the offloaded share from the disk,
as on a machine whose RAM cannot hold the model. The figures recorded next to the timings say what
share Accelerate really kept in RAM.

Spec keys: model_dir, budget_bytes, offload_folder, dtype, prompt_ids, new_tokens, warmup, reps,
pad_token_id, drop_each_pass, drop_each_rep, threads; `resident`: transformers alone with every weight
in RAM (the in-RAM scenario's baseline, runner "transformers"); `idle`: load nothing, exit (the cgroup
scenario's idle footprint).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from .measure import event, measure, worker_main

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def device_map_for(model_dir, budget_bytes: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """The device map Accelerate computes for `max_memory={"cpu": budget_bytes}` (then "disk").

    Returns (device_map, {"cpu": bytes, "disk": bytes} of parameters placed on each).
    """
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with warnings.catch_warnings(), init_empty_weights():
        warnings.simplefilter("ignore")
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # max_memory: only "cpu" is given (this machine has no GPU); infer_auto_device_map appends "disk"
    # as the device of last resort, which is what device_map="auto" with the same max_memory does.
    # no_split_module_classes: the decoder layer class, so a layer is never split between RAM and disk
    # (the setting from_pretrained itself uses for device_map="auto").
    device_map = infer_auto_device_map(meta, max_memory={"cpu": int(budget_bytes)},
                                       no_split_module_classes=meta._no_split_modules or [], dtype=dtype)
    sizes = compute_module_sizes(meta, dtype=dtype)
    placed = {"cpu": 0, "disk": 0}
    for name, dev in device_map.items():
        placed["disk" if dev == "disk" else "cpu"] += sizes[name]
    return device_map, placed


def load_offloaded(model_dir, *, budget_bytes: int, offload_folder, dtype: torch.dtype = torch.bfloat16):
    """The model loaded by transformers with Accelerate offloading; returns (model, device_map, placed bytes)."""
    from transformers import AutoModelForCausalLM

    device_map, placed = device_map_for(model_dir, budget_bytes, dtype)
    Path(offload_folder).mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,  # the checkpoint's dtype: no conversion at load
            device_map=device_map,  # explicit, computed above from max_memory={"cpu": budget}
            offload_folder=offload_folder,  # on the same disk as the model (a sibling folder)
            offload_state_dict=False,  # no temporary offload of the state dict while loading
        ).eval()
    return model, device_map, placed


def idle(spec: dict) -> dict:
    """Everything but the weights (the cgroup scenario's idle footprint): imports, config, the model on meta."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(spec["model_dir"])
    with warnings.catch_warnings(), init_empty_weights():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_config(config, dtype=DTYPES[spec["dtype"]])
    return {"idle": True}


def run_resident(spec: dict) -> dict:
    """transformers alone, every weight in RAM (the in-RAM scenario's baseline): no device map, no offload."""
    from transformers import AutoModelForCausalLM

    event("load")
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=DTYPES[spec["dtype"]]).eval()
    load_s = time.perf_counter() - t
    res = measure(model, spec)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res.update(load_s=load_s, weights_ram_bytes=nbytes, weights_disk_bytes=0)
    return res


def run(spec: dict) -> dict:
    if spec.get("idle"):
        return idle(spec)
    if spec.get("resident"):
        return run_resident(spec)
    event("load")
    t = time.perf_counter()
    model, device_map, placed = load_offloaded(spec["model_dir"], budget_bytes=spec["budget_bytes"],
                                               offload_folder=spec["offload_folder"], dtype=DTYPES[spec["dtype"]])
    load_s = time.perf_counter() - t
    # drop_each_pass (disk scenario): the page cache of both folders is emptied before every pass;
    # drop_each_rep alone (cgroup scenario): before every repetition, the memory limit evicts the rest;
    # neither (host storage): the offloaded weights are served from RAM by the page cache, Accelerate's
    # nearest to a host tier
    each_pass = spec.get("drop_each_pass", True)
    each_rep = spec.get("drop_each_rep", each_pass)
    drop = [spec["model_dir"], spec["offload_folder"]] if each_pass or each_rep else []
    res = measure(model, spec, drop_paths=drop, drop_each_pass=each_pass)
    res.update(load_s=load_s, weights_ram_bytes=placed["cpu"], weights_disk_bytes=placed["disk"],
               device_map_counts={d: sum(1 for v in device_map.values() if v == d) for d in set(device_map.values())})
    return res


if __name__ == "__main__":
    raise SystemExit(worker_main(run))
