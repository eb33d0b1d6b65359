"""Prompts: plain text, or chat messages that a tokenizer renders with its chat template.

A light module (no torch, no tasks): tasks produce prompts, the policy renders and encodes them.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]
Prompt = str | list[Message]  # plain text, or chat messages [{"role": ..., "content": ...}]


def render_prompt(tokenizer: Any, prompt: Prompt, where: str = "the model") -> str:
    """Plain text as is; chat messages through ``tokenizer``'s chat template, with the generation prompt."""
    from rspo.errors import ModelError

    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"the task gives chat messages but the tokenizer of {where} has no chat template "
            f"(use task.options.prompt_format=text, or a tokenizer with a template)"
        )
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
