"""Loading policies saved with ``save_pretrained`` (and the base policy shipped with the package)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

BASE_POLICY_DIR = Path(__file__).parent / "assets" / "countdown-base"


def load_policy(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (float32, eval mode) and tokenizer from a checkpoint directory; clear errors if either is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not a save_pretrained checkpoint")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise FileNotFoundError(f"cannot load the tokenizer from {str(path)!r}: {e}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:
        raise ValueError(f"cannot load the model from {str(path)!r} (corrupt or incomplete checkpoint?): {e}") from e
    model.eval()
    return model, tok
