"""Batched generation and scoring shared by evaluation and the RL trainer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Generation:
    """Token-level result of generating from left-padded prompts.

    sequences: ``(B, P + T)`` prompt (left-padded to P) then response (right-padded to T).
    prompt_len: P.  response_mask: ``(B, T)`` 1 on response tokens up to and including eos.
    texts: decoded responses (special tokens removed).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor
    texts: list[str]


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    greedy: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator_seed: int | None = None,
) -> Generation:
    """Generate one response per prompt with the KV cache; stops at eos or ``max_new_tokens``."""
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    ids, am = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids, attention_mask=am, max_new_tokens=max_new_tokens, do_sample=not greedy,
        temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None if greedy else 0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model.train(was_training)
    p = ids.shape[1]
    resp = out[:, p:]
    # response tokens: everything up to and including the first eos
    is_eos = resp == tokenizer.eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    resp = resp.masked_fill(after_eos, tokenizer.pad_token_id)
    sequences = torch.cat([ids, resp], 1)
    texts = tokenizer.batch_decode(resp, skip_special_tokens=True)
    return Generation(sequences, torch.cat([am, response_mask], 1), p, response_mask, texts)


def batched(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
