"""The `sparseferry` command line: a thin shell over the library.

Each subcommand parses its flags, then calls one library function with keyword arguments; the
parsed namespace never enters library code. Errors from bad input (SparseferryError) print as one
line and exit 1; Ctrl-C exits 130 without a traceback, and is ignored once the outcome is printed.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from . import _CLI
from .errors import SparseferryError


def _cmd_convert(a) -> int:
    from .convert import convert

    stats = convert(a.src, a.dst, encode_lm_head=a.encode_lm_head, encode_embeddings=a.encode_embeddings,
                    dtype=a.dtype, values=a.values, group_size=a.group_size, force=a.force, progress=not a.quiet)
    ratio = stats["stored_bytes"] / stats["dense_bytes"] if stats["dense_bytes"] else 1.0
    print(f"wrote {a.dst}: {stats['tensors']} tensors, {stats['dense_bytes'] / 1e9:.3f} GB dense -> "
          f"{stats['stored_bytes'] / 1e9:.3f} GB stored ({ratio:.3f}x), {stats['seconds']:.1f} s, {stats['gbps']:.2f} GB/s")
    if stats.get("quantized"):
        print(f"{stats['quantized']} matrices with {a.values} values, worst relative error {stats['max_rel_error']:.4f} "
              f"(per layer: sparseferry inspect {a.dst})")
    return 0


def _cmd_inspect(a) -> int:
    from .report import inspect_checkpoint, render_inspect

    rep = inspect_checkpoint(a.dir, verify=a.verify)
    print(json.dumps(rep, indent=1) if a.json else render_inspect(rep))
    return 0


def _read_prompts(a) -> list[str]:
    """--prompt (repeatable), else --prompt-file (FILE or '-' for stdin), else stdin when it is not a terminal."""
    if a.prompt and a.prompt_file:
        raise SparseferryError("give --prompt or --prompt-file, not both")
    if a.prompt:
        return a.prompt
    if a.prompt_file:
        try:
            text = sys.stdin.read() if a.prompt_file == "-" else Path(a.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise SparseferryError(f"{a.prompt_file}: cannot read the prompt ({e})") from None
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise SparseferryError("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe the prompt into stdin")
    text = text.rstrip("\n")
    if not text.strip():
        raise SparseferryError(f"the prompt from {a.prompt_file or 'stdin'} is empty")
    return [text]


def _cmd_generate(a) -> int:
    from .runtime import format_bytes, generate_text, load, load_tokenizer

    prompts = _read_prompts(a)
    if a.threads is not None:
        if a.threads < 1:
            raise SparseferryError(f"--threads {a.threads}: expected at least 1")
        import torch

        torch.set_num_threads(a.threads)
    model = load(a.dir, device=a.device, memory_budget=a.budget, storage=a.storage, direct_io=not a.page_cache,
                 verify=not a.no_verify)
    engine = model.sparseferry
    try:
        if not a.json:
            print(f"[{engine.plan.summary()}]", file=sys.stderr)
        summary, texts = generate_text(model, load_tokenizer(a.dir), prompts, max_new_tokens=a.max_new_tokens,
                                       do_sample=a.temperature > 0, temperature=a.temperature, top_p=a.top_p,
                                       top_k=a.top_k, repetition_penalty=a.repetition_penalty, stop=a.stop,
                                       chat=not a.raw, system=a.system, seed=a.seed, stream=not a.json)
    finally:
        engine.close()
    if a.json:
        print(json.dumps(dict(summary, texts=texts)))
    else:
        print()
        tps = summary["decode_tokens_per_s"]
        bpt = summary["bytes_read_per_token"]
        print(f"prefill {summary['prefill_s']:.2f} s | decode {tps or 0:.2f} tok/s | read {format_bytes(bpt or 0)}/token | "
              f"I/O wait {summary['io_wait_s']:.2f} s, decompress {summary['decompress_s']:.2f} s, "
              f"compute {summary['compute_s']:.2f} s | peak RSS {format_bytes(summary['peak_rss_bytes'])}", file=sys.stderr)
        if summary.get("experts"):
            print(experts_line(summary["experts"]), file=sys.stderr)
    return 0


def _cmd_export(a) -> int:
    from .export import export

    res = export(a.dir, a.out, to=a.to, dtype=a.dtype, max_shard_size=a.max_shard_size, force=a.force,
                 progress=not a.quiet)
    print(f"wrote {res['path']}: {a.to}, {res['tensors']} tensors in {res['shards']} shard(s), "
          f"{res['bytes'] / 1e9:.3f} GB, {res['seconds']:.1f} s")
    if a.to == "compressed-tensors":
        from .export import CT_VERSION

        print(f"warning: load it with compressed-tensors <= {CT_VERSION} (and transformers < 5), or with sparseferry. "
              "Later compressed-tensors releases have no sparse compressors: current transformers loads this folder "
              "without an error but with uninitialised (random) linear weights", file=sys.stderr)
    return 0


def _cmd_prune(a) -> int:
    from .prune import prune, render_report

    if a.calib is None and a.method != "magnitude" and not a.json:
        print("calibration: the built-in text (Python standard-library docstrings, sparseferry.text); "
              "--calib FILE to use your own", file=sys.stderr)
    rep = prune(a.src, a.dst, method=a.method, sparsity=a.sparsity, pattern=a.pattern,
                calibration=Path(a.calib) if a.calib else None,
                nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed, per_row=a.per_row, budget=a.budget,
                save_dense=a.save_dense, progress=not a.quiet)
    print(json.dumps(rep, indent=1) if a.json else render_report(rep))
    return 0


def _cmd_eval(a) -> int:
    from .evaluate import perplexity

    res = perplexity(a.dir, Path(a.text), seqlen=a.seqlen, stride=a.stride, max_windows=a.max_windows,
                     budget=a.budget, progress=not a.quiet)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{a.dir}: perplexity {res['ppl']:.4f} (mean NLL {res['nll']:.4f} nats over {res['tokens']} tokens, "
              f"{res['windows']} windows of {a.seqlen} tokens, stride {a.stride})")
    return 0


def _cmd_fetch_demo(a) -> int:
    from .demo import ensure_demo_model

    print(ensure_demo_model(a.dir, progress=not a.quiet))
    return 0


def _cmd_demo(a) -> int:
    from .demo import demo_config, run_demo

    config = demo_config(quick=a.quick, method=a.method, sparsity=a.sparsity, text=a.text, budget=a.budget,
                         prompt=a.prompt, max_new_tokens=a.max_new_tokens)
    run_demo(config, model_dir=a.model_dir, workdir=a.workdir, progress=not a.quiet)
    return 0


def experts_line(ex: dict) -> str:
    """The generate line for mixture-of-experts models: per decode token, what routing chose and what was read."""
    from .runtime.budget import format_bytes

    pct = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    size = lambda v: "-" if v is None else format_bytes(v)  # noqa: E731
    return (f"experts: {ex['chosen_per_token'] or 0:.0f} chosen/token, cache {ex['cache_slots']} of "
            f"{ex['experts_total']} experts, hit rate {pct(ex['hit_rate'])} | read ahead: "
            f"{ex['predicted_reads']} predicted, {ex['missed_reads']} missed, {ex['wasted_reads']} wasted | "
            f"experts read {size(ex['expert_bytes_read_per_token'])}/token, routing needs "
            f"{size(ex['needed_bytes_per_token'])}/token without a cache")


def _cmd_synth(a) -> int:
    from .synth import synth

    rec = synth(a.out, arch=a.arch, params=a.params, sparsity=a.sparsity, seed=a.seed, dtype=a.dtype, vocab=a.vocab,
                experts=a.experts, top_k=a.top_k, force=a.force, progress=not a.quiet)
    sh = rec["shape"]
    moe = f"{sh['experts']} experts of MLP {sh['intermediate']}, top-{sh['top_k']}" if sh.get("experts") else f"MLP {sh['intermediate']}"
    print(f"wrote {a.out}: {rec['arch']} {rec['params'] / 1e9:.3f}B parameters (hidden {sh['hidden']}, {moe}, "
          f"{sh['layers']} layers, {sh['heads']} heads / {sh['kv_heads']} KV, vocab {sh['vocab']}), {rec['dtype']}, "
          f"sparsity {rec['sparsity']:g}, seed {rec['seed']}, {rec['bytes'] / 1e9:.3f} GB")
    return 0


def _cmd_bench(a) -> int:
    from .bench import bench, sweep
    from .bench.report import render_table

    common = dict(out=a.out, arch=a.arch, params=a.params, seed=a.seed, vocab=a.vocab, batch=a.batch,
                  prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, warmup=a.warmup, reps=a.reps, threads=a.threads,
                  workdir=a.workdir, progress=not a.quiet)
    if a.sweep_sparsity or a.sweep_budget:
        if a.model_dir:
            raise SparseferryError("a sweep runs on synthetic models: drop MODEL_DIR or the --sweep-* flags")
        if a.scenario != "disk" or a.llama_cpp or a.rounds != 1:
            raise SparseferryError("a sweep runs the disk scenario without llama.cpp, one round a point: drop --scenario / "
                                   "--llama-cpp / --rounds")
        doc = sweep(sparsities=a.sweep_sparsity or str(a.sparsity), budgets=a.sweep_budget or a.budget or "30%",
                    storage=a.storage or "disk", **common)
        for p in doc["points"]:
            print(f"sparsity {p['sparsity']:g}, budget {p['budget']}: {p['speedup_vs_accelerate'] or 0:.2f}x vs Accelerate "
                  f"({p['decode_s_per_token'] * 1e3:.0f} ms/token)")
        print(f"wrote {a.out}/sweep.json" + (" and sweep.png" if (Path(a.out) / "sweep.png").exists() else ""))
        return 0
    from .bench import select_systems

    systems = select_systems(a.systems) if a.systems else None
    res = bench(a.model_dir, budget=a.budget, storage=a.storage, scenario=a.scenario, sparsity=a.sparsity,
                dense_dir=a.dense_dir, systems=systems, llama_cpp=a.llama_cpp, llama_cpp_src=a.llama_cpp_src,
                cgroup_slack=int(a.cgroup_slack * 1e9), rounds=a.rounds, **common)
    print(json.dumps(res, indent=1) if a.json else render_table(res))
    print(f"wrote {a.out}/results.json, results.md" + (", results.png" if (Path(a.out) / "results.png").exists() else ""),
          file=sys.stderr)
    return 0


def _cmd_serve(a) -> int:
    from .serve.server import serve

    serve(a.dir, host=a.host, port=a.port, budget=a.budget, kv_budget=a.kv_budget, max_batch=a.max_batch,
          prefill_chunk=a.prefill_chunk, max_queue=a.max_queue, storage=a.storage, device=a.device,
          direct_io=not a.page_cache, api_key=a.api_key, model_name=a.model_name)
    return 0


def _cmd_chat(a) -> int:
    from .chat import run_chat

    run_chat(a.dir, budget=a.budget, storage=a.storage, device=a.device, max_tokens=a.max_tokens,
             temperature=a.temperature, top_p=a.top_p, seed=a.seed, system=a.system)
    return 0


def _cmd_bench_serve(a) -> int:
    from .serve.bench import bench_serve, render_bench

    res = bench_serve(a.dir, budget=a.budget, clients=[int(c) for c in a.clients.split(",")], prompt_tokens=a.prompt_tokens,
                      new_tokens=a.new_tokens, storage=a.storage, out=a.out, progress=not a.quiet)
    print(json.dumps(res, indent=1) if a.json else render_bench(res))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="sparseferry", description="Run LLMs larger than memory from bitmap-compressed sparse weights.")
    ap.add_argument("--version", action="version", version=f"sparseferry {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a HuggingFace checkpoint folder into a sparseferry checkpoint")
    p.add_argument("src", help="HuggingFace model folder (config.json + *.safetensors or *.bin)")
    p.add_argument("dst", help="output folder (must not exist unless --force)")
    p.add_argument("--encode-lm-head", action="store_true", help="also store lm_head in the bitmap format (with --values int8/int4: "
                   "quantized too, and held and multiplied in that form on the CPU)")
    p.add_argument("--encode-embeddings", action="store_true", help="also store the embeddings in the bitmap format")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="cast weights (default: keep)")
    p.add_argument("--values", choices=["bf16", "fp16", "int8", "int4"],
                   help="non-zero values of the bitmap-encoded matrices: cast, or quantized (int8 symmetric, "
                        "int4 asymmetric; default: as they are)")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="int8/int4: non-zeros per scale along a row, 0 = one scale per row "
                        "(default 512 for int8, 128 for int4)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists (only once the new one is complete)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("inspect", help="per-layer sparsity, sizes and compression of a checkpoint")
    p.add_argument("dir", help="sparseferry checkpoint folder")
    p.add_argument("--verify", action="store_true", help="also verify every checksum and bitmap")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("generate", help="generate text from a sparseferry checkpoint under a memory budget",
                       description="Generate text from a sparseferry checkpoint. Prompts go through the model's chat "
                                   "template when it has one (--raw to send them as they are).")
    p.add_argument("dir", help="sparseferry checkpoint folder")
    p.add_argument("-p", "--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("-f", "--prompt-file", metavar="FILE", help="read the prompt from FILE ('-' = stdin); "
                   "without --prompt or --prompt-file a piped stdin is the prompt")
    p.add_argument("--system", "--system-prompt", dest="system", default=None, help="system prompt (needs a chat template)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template: the prompt is the model's input as it is")
    p.add_argument("-n", "--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--budget", default=None, help="memory budget for weights: '4GiB', '512MB' or '30%%' of the stored weights (default: no limit)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--storage", choices=["disk", "host"], default="disk", help="where streamed layers live (default disk)")
    p.add_argument("--page-cache", action="store_true", help="disk reads through the page cache (default: bypass it, O_DIRECT)")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification of streamed layers")
    p.add_argument("--temperature", "--temp", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens (default: all)")
    p.add_argument("--repetition-penalty", "--repeat-penalty", dest="repetition_penalty", type=float, default=None,
                   help="penalise tokens already present (transformers' repetition_penalty; 1.0 = none, default)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop when TEXT is generated (repeatable)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for compute (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("export", help="write a checkpoint as a HuggingFace folder (dense) or compressed-tensors sparse-bitmask",
                       description="Write a sparseferry checkpoint back out, one tensor at a time: --to hf gives plain "
                                   "sharded safetensors that transformers, vLLM and llama.cpp's converter read (quantized "
                                   "values dequantized); --to compressed-tensors gives the sparse-bitmask layout of "
                                   "compressed-tensors 0.14.0.1.")
    p.add_argument("dir", help="sparseferry checkpoint folder")
    p.add_argument("out", help="output folder (must not exist unless --force)")
    p.add_argument("--to", choices=["hf", "compressed-tensors"], default="hf", help="output layout (default hf)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="cast weights (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB", help="tensor bytes per safetensors shard (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("prune", help="prune a HuggingFace model (magnitude, Wanda, SparseGPT) into a sparseferry checkpoint")
    p.add_argument("src", help="HuggingFace model folder")
    p.add_argument("dst", help="output folder (must not exist)")
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], default="wanda", help="default wanda")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of each linear weight (and of each expert's matrices) set to zero (default 0.5)")
    p.add_argument("--pattern", default=None, metavar="N:M", help="semi-structured: keep N of every M weights, e.g. 2:4 (overrides --sparsity)")
    p.add_argument("--calib", default=None, metavar="FILE", help="calibration text: plain text, or JSONL with a \"text\" field (wanda, sparsegpt; default: the "
                        "built-in text, Python standard-library docstrings)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    p.add_argument("--per-row", action="store_true", help="magnitude/sparsegpt: prune the same fraction of every output row")
    p.add_argument("--budget", default=None, help="memory budget, e.g. '8GiB': refuse to start if the estimate exceeds it")
    p.add_argument("--save-dense", action="store_true", help="write a HuggingFace folder with the zeros stored densely instead")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser("eval", help="perplexity of a HuggingFace folder or sparseferry checkpoint on a text file")
    p.add_argument("dir", help="HuggingFace model folder (dense or pruned) or sparseferry checkpoint")
    p.add_argument("--text", required=True, metavar="FILE", help="evaluation text: plain text, or JSONL with a \"text\" field")
    p.add_argument("--seqlen", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--stride", type=int, default=512, help="new tokens scored per window after the first (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    p.add_argument("--budget", default=None, help="memory budget of a sparseferry checkpoint's weights, e.g. '2GiB'")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("fetch-demo", help="export the demo model (SmolLM2-135M-Instruct) once into the cache; print its folder")
    p.add_argument("dir", nargs="?", default=None,
                   help="target folder (default $SPARSEFERRY_CACHE or ~/.cache/sparseferry, then /smollm2-135m-instruct)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_fetch_demo)

    p = sub.add_parser("demo", help="the whole story on a real model: export, prune, convert, generate under a budget, perplexity")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny calibration and evaluation, 8 new tokens")
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], default=None, help="pruning method (default wanda)")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of each linear weight set to zero (default 0.5)")
    p.add_argument("--text", default=None, help="text source: 'stdlib' (default), 'web' (World English Bible, if installed) or a text file")
    p.add_argument("--budget", default=None, help="memory budget while generating, e.g. '50%%' (default) or '100MB'")
    p.add_argument("--prompt", default=None, help="question asked to the model (default: 'What is Python?')")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default 32)")
    p.add_argument("--model-dir", default=None, help="the exported demo model (default: the fetch-demo cache folder)")
    p.add_argument("--workdir", default=None, help="where the pruned model and checkpoint go (default: <cache>/demo-run)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("synth", help="write a synthetic HuggingFace model of a given size (random, magnitude-pruned)")
    p.add_argument("out", help="output folder")
    p.add_argument("--arch", default="llama", help="llama (default), mistral, qwen2, gpt_neox; mixtures of experts: "
                                                  "mixtral (8 experts, top-2), qwen3_moe (128 experts, top-8)")
    p.add_argument("--params", default="1B", help="parameter count, e.g. 1B (TinyLlama-1.1B shape), 350M, 7B (default 1B)")
    p.add_argument("--experts", type=int, default=None, help="mixtral/qwen3_moe: routed experts per layer (default: as above)")
    p.add_argument("--top-k", type=int, default=None, help="mixtral/qwen3_moe: experts chosen per token (default: as above)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of each decoder linear weight zeroed by magnitude (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="weights depend only on seed and tensor name (default 0)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("bench", help="benchmark sparseferry against Accelerate offloading and this machine's physical bound")
    p.add_argument("model_dir", nargs="?", default=None, metavar="MODEL_DIR",
                   help="HuggingFace folder of a pruned model stored densely (default: a synthetic model)")
    p.add_argument("--scenario", choices=["disk", "cgroup", "ram"], default="disk",
                   help="disk: streamed weights read from the disk, no memory limit (default); cgroup: RAM smaller than "
                        "the model, every system in a memory cgroup of budget + its idle footprint + slack, page cache "
                        "charged (needs root); ram: everything resident (transformers dense, sparseferry --budget 100%%, llama.cpp)")
    p.add_argument("--budget", default=None,
                   help="memory budget: share of the dense weights or a size ('2GiB'); default 30%%, 100%% with --scenario ram")
    p.add_argument("--storage", choices=["disk", "host"], default=None,
                   help="where offloaded weights live (default disk; cgroup: disk, ram: host)")
    p.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="llama.cpp build folder or its bin/ (llama-bench, llama-quantize): adds llama.cpp-bf16/-q8_0/-q4_0 "
                        "rows in the cgroup and ram scenarios (benchmarks/build_llama_cpp.sh builds one)")
    p.add_argument("--llama-cpp-src", default=None, metavar="DIR",
                   help="llama.cpp source tree with convert_hf_to_gguf.py and gguf-py (default: found near --llama-cpp)")
    p.add_argument("--cgroup-slack", type=float, default=0.3, metavar="GB",
                   help="added to every system's cgroup limit in the cgroup scenario (default 0.3 GB)")
    p.add_argument("--out", default="results", help="folder for results.json, results.md, results.png (default results/)")
    p.add_argument("--workdir", default=None, help="models, checkpoints and logs (default OUT/work)")
    p.add_argument("--dense-dir", default=None, help="the unpruned twin of MODEL_DIR (for sparseferry-dense)")
    p.add_argument("--arch", default="llama", help="synthetic model family (default llama)")
    p.add_argument("--params", default="1B", help="synthetic model size (default 1B)")
    p.add_argument("--sparsity", type=float, default=0.5, help="synthetic model sparsity (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=None, help="synthetic model vocabulary (default 32000)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated (default 16)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per system (default 1)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per system, median reported (default 3)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every system this many times, the whole list one round after another, and report each "
                        "system's median round and same-round speedups (default 1; 3 on a shared, noisy machine)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every system (default: torch's)")
    p.add_argument("--sweep-sparsity", default=None, metavar="S1,S2,...", help="sweep synthetic sparsities, e.g. 0.5,0.6,0.7")
    p.add_argument("--sweep-budget", default=None, metavar="B1,B2,...", help="sweep budgets, e.g. 20%%,30%%,50%%")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")
    p.add_argument("--systems", default=None, metavar="S1,S2,...",
                   help="run only these systems (default: the scenario's: accelerate, sparseferry-dense, sparseferry-bitmap, "
                        "sparseferry-bitmap-int8, sparseferry-bitmap-int4; cgroup adds the llama.cpp rows; ram: transformers, "
                        "the three bitmap systems, the llama.cpp rows)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching: one read of a layer serves every request)")
    p.add_argument("dir", help="sparseferry checkpoint folder")
    p.add_argument("--budget", default=None, help="memory budget for weights: '4GiB' or '30%%' of the stored weights (default: no limit)")
    p.add_argument("--kv-budget", default=None, help="KV cache of all sequences in flight, e.g. '512MiB' (default: MAX_BATCH full contexts)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per step (default 8)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per step (default 256)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429 (default 64)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ endpoints")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the checkpoint folder's name)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--storage", choices=["disk", "host"], default="disk", help="where streamed layers live (default disk)")
    p.add_argument("--page-cache", action="store_true", help="disk reads through the page cache (default: bypass it, O_DIRECT)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("chat", help="interactive terminal chat (the checkpoint's chat template, streamed tokens)")
    p.add_argument("dir", help="sparseferry checkpoint folder")
    p.add_argument("--budget", default=None, help="memory budget for weights (default: no limit)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--storage", choices=["disk", "host"], default="disk", help="where streamed layers live (default disk)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="a system message at the start of the conversation")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("bench-serve", help="aggregate decode tokens/s and disk bytes per token at 1..N concurrent requests")
    p.add_argument("dir", help="sparseferry checkpoint folder")
    p.add_argument("--budget", default="30%", help="memory budget for weights (default 30%%)")
    p.add_argument("--clients", default="1,2,4,8,16", help="concurrent requests per point (default 1,2,4,8,16)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--storage", choices=["disk", "host"], default="disk", help="where streamed layers live (default disk)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_bench_serve)

    return ap


def _run(a) -> tuple[int, str | None]:
    """The command's exit code and its one-line message, if any."""
    try:
        return a.func(a), None
    except SparseferryError as e:
        return 1, f"sparseferry: error: {e}"
    except OSError as e:  # the environment (disk full, permissions), not the input: still one line
        where = f"{e.filename}: " if e.filename else ""
        return 1, f"sparseferry: error: {where}{e.strerror or e}"


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        code, message = _run(a)
    except KeyboardInterrupt:
        code, message = 130, "sparseferry: interrupted"
    if _CLI:
        # The console script's own process, its outcome settled: what is left is the interpreter's
        # shutdown (atexit callbacks, finalizers such as torch's), where a Ctrl-C could only add a
        # traceback to the one line below. In-process callers keep their own Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if message:
        print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
