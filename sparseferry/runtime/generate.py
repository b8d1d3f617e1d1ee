"""Generating text with a loaded model: prompts (chat template), batching with left padding, streaming, statistics."""
from __future__ import annotations

from ..errors import SparseferryError


class PromptError(SparseferryError):
    """A prompt option that cannot apply to this model (e.g. a system prompt without a chat template)."""


def format_prompts(tokenizer, prompts: list[str], *, chat: bool = True, system: str | None = None) -> tuple[list[str], bool]:
    """The texts to tokenize, and whether they came from the chat template.

    chat: apply the tokenizer's chat template (one user turn, plus `system`, plus the assistant
    header) when it has one; without one the prompt is used as it is. `system` needs a template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if system is not None and not (chat and has_template):
        why = "raw prompts (--raw) have no roles" if not chat else "this model's tokenizer has no chat template"
        raise PromptError(f"a system prompt needs a chat template, and {why}: write the instructions into the prompt instead")
    if not (chat and has_template):
        return prompts, False
    out = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    return out, True


def generate_text(model, tokenizer, prompts, *, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                  top_p: float = 1.0, seed: int = 0, stream: bool = False, chat: bool = False, system: str | None = None,
                  top_k: int | None = None, repetition_penalty: float | None = None,
                  stop: list[str] | None = None) -> tuple[dict, list[str]]:
    """Generate from one or more prompts; returns (engine summary, completions). Streams to stdout if asked.

    chat / system: see `format_prompts`. top_k: sampling from the k most likely tokens (0 or None: all).
    repetition_penalty: transformers' (CTRL) penalty, 1.0 = none. stop: strings that end generation
    (the completion ends with the stop string).
    """
    import torch
    from transformers import TextStreamer

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts_in, templated = format_prompts(tokenizer, prompts, chat=chat, system=system)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    # a chat template writes its own special tokens (BOS included)
    enc = tokenizer(texts_in, return_tensors="pt", padding=True,
                    add_special_tokens=not templated).to(model.sparseferry.device)
    torch.manual_seed(seed)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or 0)
    elif top_k:
        raise PromptError("--top-k applies to sampling: give a --temperature above 0")
    if repetition_penalty is not None and repetition_penalty != 1.0:
        if repetition_penalty <= 0:
            raise PromptError(f"repetition penalty {repetition_penalty}: expected a positive number (1.0 = none)")
        kwargs["repetition_penalty"] = repetition_penalty
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    if stream and len(prompts) == 1:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=templated, skip_special_tokens=True)
    model.sparseferry.reset_stats()
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    if stream and len(prompts) > 1:
        for t in texts:
            print(t)
    return model.sparseferry.summary(), texts
