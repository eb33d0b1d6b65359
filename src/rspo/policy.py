"""Loading a policy: a checkpoint with its tokenizer, device, dtype, padding, stop ids and chat template.

    policy = load_policy("path/to/checkpoint", device="auto", dtype="bfloat16")
    ids, attention_mask = policy.encode([task.prompt(x) for x in examples])

Generation is :mod:`rspo.sampler`, response log-probs :mod:`rspo.logprobs`.

- A local directory is checked piece by piece (config, model type, weights, tokenizer: each a clear
  :class:`~rspo.errors.ModelError`); anything else is passed to transformers as a hub id, which works
  where the user has a cache or network (rspo downloads nothing itself). Remote code is never trusted.
- The tokenizer pads on the left; a tokenizer without a pad token pads with its eos token.
- Stop ids: the tokenizer's eos and every eos id of the model's ``generation_config`` (Qwen3: two).
- Chat messages are rendered with the tokenizer's chat template (an error if it has none); plain
  text prompts are used as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rspo.assets import resolve_model
from rspo.errors import ModelError
from rspo.prompts import Prompt, render_prompt

Tensor = torch.Tensor
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""A tokenizer's vocabulary, in one of the forms transformers saves (tokenizer_config.json alone is not one)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
Device = Literal["auto", "cpu", "cuda"]
DType = Literal["float32", "bfloat16"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device=cuda but torch sees no CUDA device (use device=auto or cpu)")
    if device not in ("cpu", "cuda"):
        raise ModelError(f"device={device!r}; valid: auto, cpu, cuda")
    return torch.device(device)


def resolve_model_path(model: str) -> str:
    """``base`` and ``builtin:NAME`` -> the shipped policy's directory (:mod:`rspo.assets`); anything else
    unchanged (a checkpoint directory or a hub id)."""
    return resolve_model(model)


@dataclass
class Policy:
    """A causal LM with its tokenizer, placed on one device in one dtype."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: str
    device: torch.device
    dtype: torch.dtype
    stop_ids: tuple[int, ...]

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def render(self, prompt: Prompt) -> str:
        """Plain text as is; chat messages through the tokenizer's chat template (with the generation prompt)."""
        return render_prompt(self.tokenizer, prompt, self.path)

    def encode(self, prompts: Sequence[Prompt]) -> tuple[Tensor, Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask`` ``(B, P)`` on the policy's device.

        Rendered chat text already holds its special tokens; plain text gets the tokenizer's own
        (e.g. a BOS), as the model saw in pretraining."""
        chat = [not isinstance(p, str) for p in prompts]
        if any(chat) and not all(chat):
            raise ValueError("a batch of prompts must be all text or all chat messages")
        enc = self.tokenizer(
            [self.render(p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=not any(chat)
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)


def policy_of(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str = "(in memory)") -> Policy:
    """A :class:`Policy` around a model already in memory (pretraining, tests), on its own device and dtype."""
    param = next(model.parameters())
    return Policy(model, tokenizer, path, param.device, param.dtype, _stop_ids(model, tokenizer))


def _stop_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids = [tok.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def load_policy(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
) -> Policy:
    """The policy at ``path`` (a local checkpoint directory or a hub id), in eval mode; see the module doc."""
    path = str(path)
    local = Path(path).expanduser()
    if dtype not in DTYPES:
        raise ModelError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
    dev = resolve_device(device)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"{path!r} has no config.json: not a save_pretrained checkpoint")
        try:
            AutoConfig.from_pretrained(local)
        except (ValueError, KeyError, OSError) as e:
            raise ModelError(f"{local / 'config.json'}: {_first_line(e)}") from None
        if not any((local / f).is_file() for f in WEIGHT_FILES):
            raise ModelError(f"{path!r} has no model weights (expected one of {', '.join(WEIGHT_FILES)})")
        if not any((local / f).is_file() for f in TOKENIZER_FILES):  # transformers would build an empty one
            raise ModelError(
                f"{path!r} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)}); "
                "save the tokenizer next to the model (tokenizer.save_pretrained)"
            )
        source = str(local)
    elif _HUB_ID.match(path) and not path.startswith((".", "/", "~")):
        source = path  # a hub id: transformers resolves it from its cache (or the network, where there is one)
    else:
        raise ModelError(f"model directory {path!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer of {path!r}: {_first_line(e)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], trust_remote_code=False)
    except Exception as e:
        raise ModelError(
            f"cannot load the model from {path!r} (corrupt or incomplete checkpoint?): {_first_line(e)}"
        ) from None
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    if len(tok) < 2 or not tok("0 1 a b", add_special_tokens=False)["input_ids"]:
        raise ModelError(f"the tokenizer of {path!r} is empty ({len(tok)} token(s)): its vocabulary files are missing")
    if vocab is not None and len(tok) > vocab:
        raise ModelError(
            f"the tokenizer of {path!r} has {len(tok)} tokens but the model embeds only {vocab} "
            "(a tokenizer of another model?)"
        )
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"the tokenizer of {path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.to(dev)
    model.eval()
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Policy(model, tok, path, dev, DTYPES[dtype], _stop_ids(model, tok))
