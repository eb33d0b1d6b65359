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
