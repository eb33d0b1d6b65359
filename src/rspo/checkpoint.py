"""Loading policies saved with ``save_pretrained`` (and the base policy shipped with the package)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rspo.errors import ModelError

BASE_POLICY_DIR = Path(__file__).parent / "assets" / "countdown-base"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def load_policy(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (float32, eval mode) and tokenizer from a checkpoint directory.

    Every missing or unusable piece raises :class:`~rspo.errors.ModelError` naming the directory and
    the piece (config, model type, tokenizer, weights). Weights load through transformers, which
    reads ``.bin`` files with ``weights_only=True``; remote code is never trusted.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise ModelError(f"{str(path)!r} has no config.json: not a save_pretrained checkpoint")
    try:
        AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise ModelError(f"{path / 'config.json'}: {_first_line(e)}") from None
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelError(f"{str(path)!r} has no model weights (expected one of {', '.join(WEIGHT_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer from {str(path)!r}: {_first_line(e)}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:
        raise ModelError(
            f"cannot load the model from {str(path)!r} (corrupt or incomplete checkpoint?): {_first_line(e)}"
        ) from None
    model.eval()
    return model, tok
