"""Shared fixtures: a tiny randomly initialised MoE model and a local tokenizer (no downloads)."""

from __future__ import annotations

import pytest
import torch


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in "0123456789+-*/()= <>abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_moe_and_tokenizer():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=1,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
    )
    return Qwen3MoeForCausalLM(cfg), tok


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> str:
    """A tiny Qwen3-MoE pretrained a few seconds on Countdown: it writes answer tags, so rewards vary."""
    from rspo.lab.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("policy") / "tiny"
    pretrain(
        PretrainConfig(
            preset="tiny-qwen3-moe",
            out_dir=str(out),
            steps=80,
            batch_size=32,
            lr=3e-3,
            warmup_steps=10,
            eval_every=0,
            final_eval=False,
            shuffle_buffer=64,
            threads=1,
        ),
        progress=False,
    )
    return str(out)


FAMILIES = ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral", "tiny-olmoe", "tiny-gpt-oss", "tiny-deepseek-v3"]


@pytest.fixture(scope="session")
def bpe():
    """The byte-level BPE tokenizer with a ChatML template, trained here on the shipped math text."""
    from rspo.lab.tokenizer import build_bpe_tokenizer

    return build_bpe_tokenizer()


@pytest.fixture(scope="session")
def family_dirs(bpe, tmp_path_factory) -> dict[str, str]:
    """A saved tiny random model of each MoE family with the BPE tokenizer (eos = <|im_end|>, and a second
    stop id in the generation config, as Qwen3 has)."""
    from rspo.lab.presets import build_model

    out = {}
    for preset in FAMILIES:
        d = tmp_path_factory.mktemp(preset)
        model = build_model(preset, len(bpe), seed=0, pad_token_id=bpe.pad_token_id, eos_token_id=bpe.eos_token_id)
        model.generation_config.eos_token_id = [bpe.eos_token_id, bpe.pad_token_id]
        model.save_pretrained(d)
        bpe.save_pretrained(d)
        out[preset] = str(d)
    return out
