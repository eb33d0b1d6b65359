"""A character-level tokenizer built locally (no downloads), as a transformers PreTrainedTokenizerFast.

Every character of the alphabet is one token; ``<answer>`` and ``</answer>`` are single tokens
(they are part of every response). ``<pad>`` pads, ``<eos>`` ends a response. Saved with
``save_pretrained`` next to the model, so ``AutoTokenizer.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ("<pad>", "<eos>", "<unk>")
TAGS = ("<answer>", "</answer>")
COUNTDOWN_ALPHABET = "0123456789+-*/() =>\n"


def build_char_tokenizer(alphabet: str = COUNTDOWN_ALPHABET) -> PreTrainedTokenizerFast:
    """Tokenizer with ids: <pad>=0, <eos>=1, <unk>=2, <answer>, </answer>, then the alphabet in order."""
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has repeated characters")
    vocab = {tok: i for i, tok in enumerate((*SPECIAL, *TAGS, *alphabet))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()  # concatenate, no spaces between characters
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    tok.add_tokens(list(TAGS))  # matched before character splitting
    return tok


# A ChatML template (the format of Qwen's chat models): what `apply_chat_template` renders.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BPE_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def shipped_text() -> list[str]:
    """Text shipped with rspo to train a tokenizer on: the math sample set and the arithmetic files."""
    import json

    from rspo.tasks.files import DATA_DIR

    out = []
    for f in sorted((DATA_DIR / "math").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            out += [v for k, v in row.items() if isinstance(v, str) and k != "id"]
            out += [m["content"] for m in row.get("prompt", []) if isinstance(m, dict)]
    return out


def build_bpe_tokenizer(texts: list[str] | None = None, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here (no downloads) on ``texts`` (default: :func:`shipped_text`),
    with ChatML special tokens and chat template: eos ``<|im_end|>`` (ends an assistant turn), pad
    ``<|endoftext|>``, left padding. Deterministic for the same texts and size."""
    from tokenizers import trainers

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIAL),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts if texts is not None else shipped_text(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok
