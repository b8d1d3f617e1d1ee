"""Generating text with a loaded model: tokenization, batching with left padding, streaming, statistics."""
from __future__ import annotations


def generate_text(model, tokenizer, prompts, *, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                  top_p: float = 1.0, seed: int = 0, stream: bool = False) -> tuple[dict, list[str]]:
    """Generate from one or more prompts; returns (engine summary, completions). Streams to stdout if asked."""
    import torch
    from transformers import TextStreamer

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.sparseferry.device)
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if stream and len(prompts) == 1:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_special_tokens=True)
    model.sparseferry.reset_stats()
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    if stream and len(prompts) > 1:
        for t in texts:
            print(t)
    return model.sparseferry.summary(), texts
