"""Policies: a checkpoint with its tokenizer, device, dtype, padding, stop ids and chat template;
generation behind a small sampler interface; response log-probs that keep memory at one mini-batch
of logits.

    policy = load_policy("path/to/checkpoint", device="auto", dtype="bfloat16")
    gen = HFSampler(policy).sample([task.prompt(x) for x in examples], max_new_tokens=1024, seed=0)
    logp, entropy, aux = response_log_probs(policy.model, gen.sequences, gen.attention_mask, T)

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
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from rspo.errors import ModelError
from rspo.tasks.base import Prompt

Tensor = torch.Tensor
# model: base. The main testbed (issue 13): Qwen3-MoE, 64 experts, top-8, pretrained with a habit the RL task
# penalises. The first testbed (8 experts, top-1) stays shipped as builtin:countdown-base.
BASE_POLICY_DIR = Path(__file__).parent / "assets" / "countdown-e64k8"
E8K1_BASE_DIR = Path(__file__).parent / "assets" / "countdown-base"  # the first testbed; the benchmarks' model
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


ASSETS = Path(__file__).parent / "assets"


def resolve_model_path(model: str) -> str:
    """``base`` -> the shipped main Countdown base policy (64 experts, top-8); ``builtin:NAME`` -> the policy
    ``NAME`` shipped with rspo (``src/rspo/assets/``); anything else unchanged (a directory or a hub id)."""
    if model == "base":
        return str(BASE_POLICY_DIR)
    if model.startswith("builtin:"):
        name = model[len("builtin:") :]
        shipped = sorted(d.name for d in ASSETS.iterdir() if (d / "config.json").is_file())
        if name not in shipped:
            raise ModelError(f"model={model!r}: no such shipped policy; shipped: {', '.join(shipped)}")
        return str(ASSETS / name)
    return model


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
        enc = self.tokenizer([self.render(p) for p in prompts], return_tensors="pt", padding=True,
                             add_special_tokens=not any(chat))  # fmt: skip
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, where: str = "the model") -> str:
    """Plain text as is; chat messages through ``tokenizer``'s chat template, with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"the task gives chat messages but the tokenizer of {where} has no chat template "
            f"(use task.options.prompt_format=text, or a tokenizer with a template)"
        )
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


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
            raise ModelError(f"{path!r} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)}); "
                             "save the tokenizer next to the model (tokenizer.save_pretrained)")  # fmt: skip
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
        raise ModelError(f"the tokenizer of {path!r} has {len(tok)} tokens but the model embeds only {vocab} "
                         "(a tokenizer of another model?)")  # fmt: skip
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


# ----------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------
@dataclass
class Generation:
    """Token-level result of sampling one response per prompt.

    sequences: ``(B, P + T)`` prompt (left-padded to P) then response (right-padded to T with pad).
    attention_mask: ``(B, P + T)``.  prompt_len: P.  response_mask: ``(B, T)`` 1 on response tokens,
    up to and including the stop token (or the last token of a stop string).  texts: decoded responses
    (special tokens removed).  logprobs: ``(B, T)`` float32, the sampler's own log-probs of the response
    tokens under softmax(logits / temperature) (before top-p, as the trainer scores them), 0 after the
    response; None for greedy decoding. An engine that reports them makes rollout correction possible.
    """

    sequences: Tensor
    attention_mask: Tensor
    prompt_len: int
    response_mask: Tensor
    texts: list[str]
    logprobs: Tensor | None = None


class _FinishRecorder(StoppingCriteria):
    """Marks a sequence done at a stop id or once a stop string appears in its response, and records its
    response length (the stop token, or the token that completed the stop string, included).

    Stop strings are matched on the decoded text of the newest tokens (enough of them to hold the longest
    string), for any tokenizer; an occurrence is found at the step that completes it.
    """

    def __init__(self, stop_ids: Sequence[int], stop_strings: Sequence[str], tokenizer, batch: int, prompt_len: int,
                 device: torch.device) -> None:  # fmt: skip
        self.stop_ids = torch.tensor(list(stop_ids), device=device)
        self.strings, self.tokenizer, self.prompt_len = list(stop_strings), tokenizer, prompt_len
        self.window = max((len(x) for x in self.strings), default=0) + 1
        self.lengths = torch.full((batch,), -1, dtype=torch.long, device=device)

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        done = torch.isin(input_ids[:, -1], self.stop_ids)
        if self.strings:
            tail = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window) :].tolist()
            texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
            hit = [any(x in t for x in self.strings) for t in texts]
            done = done | torch.tensor(hit, device=done.device)
        newly = done & (self.lengths < 0)
        self.lengths[newly] = input_ids.shape[1] - self.prompt_len
        return done | (self.lengths >= 0)


class _LogProbRecorder(LogitsProcessor):
    """Records the log-prob of each sampled token under softmax(logits / temperature), while ``generate``
    samples: it sees each step's logits (custom processors run before the sampling warpers) and keeps
    only one step's log-softmax (B, V) until the next call reveals the token drawn from it."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.prev: Tensor | None = None
        self.out: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.prev is not None:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, tokens: Tensor) -> None:
        self.out.append(self.prev.gather(-1, tokens[:, None]).squeeze(-1))
        self.prev = None

    def finish(self, response: Tensor) -> Tensor:
        """``(B, T)`` log-probs given the generated response ``(B, T)`` (its last token not yet taken)."""
        if self.prev is not None:
            self._take(response[:, len(self.out)])
        if len(self.out) != response.shape[1]:
            raise RuntimeError(f"recorded {len(self.out)} log-probs for {response.shape[1]} generated tokens")
        return torch.stack(self.out, 1) if self.out else response.new_zeros(response.shape, dtype=torch.float32)


class Sampler:
    """Interface of a rollout engine: one response per prompt."""

    def sample(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        greedy: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_strings: Sequence[str] = (),
    ) -> Generation:
        raise NotImplementedError


class HFSampler(Sampler):
    """transformers ``generate`` with the KV cache, on the policy's own model.

    Only the sampling parameters given here apply (a fresh GenerationConfig: no top-k, repetition penalty
    or temperature hidden in the checkpoint's ``generation_config``), so the distribution sampled is
    exactly softmax(logits / temperature) restricted to the top-p nucleus. Sampled generations report
    the sampler's log-probs (:class:`Generation`).
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int,
        greedy: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_strings: Sequence[str] = (),
    ) -> Generation:
        pol = self.policy
        ids, am = pol.encode(prompts)  # (B, P)
        b, p = ids.shape
        rec = _FinishRecorder(pol.stop_ids, stop_strings, pol.tokenizer, b, p, pol.device)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, num_beams=1,
                               temperature=None if greedy else temperature, top_p=None if greedy else top_p,
                               top_k=None if greedy else 0, eos_token_id=list(pol.stop_ids),
                               pad_token_id=pol.pad_id)  # fmt: skip
        if seed is not None:
            torch.manual_seed(seed)
        logp_rec = None if greedy else _LogProbRecorder(temperature)
        was_training = pol.model.training
        pol.model.eval()
        try:
            out = pol.model.generate(input_ids=ids, attention_mask=am, generation_config=cfg,
                                     stopping_criteria=StoppingCriteriaList([rec]),
                                     logits_processor=LogitsProcessorList([logp_rec] if logp_rec else []))  # fmt: skip
        finally:
            pol.model.train(was_training)
        resp = out[:, p:]  # (B, T)
        t = resp.shape[1]
        lengths = torch.where(rec.lengths < 0, torch.full_like(rec.lengths, t), rec.lengths)
        response_mask = (torch.arange(t, device=resp.device)[None, :] < lengths[:, None]).long()
        logprobs = None
        if logp_rec is not None:
            logprobs = logp_rec.finish(resp).masked_fill(response_mask == 0, 0.0)  # (B, T)
        resp = resp.masked_fill(response_mask == 0, pol.pad_id)
        texts = pol.tokenizer.batch_decode([r[:n] for r, n in zip(resp.tolist(), lengths.tolist(), strict=True)],
                                           skip_special_tokens=True)  # fmt: skip
        return Generation(torch.cat([ids, resp], 1), torch.cat([am, response_mask], 1), p, response_mask, texts,
                          logprobs)  # fmt: skip


# ----------------------------------------------------------------------------------------
# Response log-probs without a (B, T, V) tensor
# ----------------------------------------------------------------------------------------
CHUNK_BYTES = 1 << 26
"""Float32 logits of one chunk of tokens stay under this many bytes (64 MiB: 110 tokens at V = 150k)."""


def _chunk(v: int) -> int:
    return max(1, CHUNK_BYTES // max(1, 4 * v))


class _FusedHeadLogProb(torch.autograd.Function):
    """log softmax((h W^T + b) / temperature)[target] per token and the entropy, chunk by chunk over tokens.

    Neither the logits nor a log-softmax of the whole mini-batch exists at any time: the forward keeps
    the hidden states (already needed) and a logsumexp per token; the backward recomputes each chunk's
    logits, turns them into d logits = g (onehot - softmax), and accumulates the gradients of the hidden
    states and of the head's weight (and bias). Float32 math for any parameter dtype (float64 for float64).
    The entropy is an output without gradient.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, want_entropy: bool,
                temperature: float):  # fmt: skip
        n, v = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        inv_t = 1.0 / temperature
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        ent = torch.empty(n if want_entropy else 0, dtype=acc, device=hidden.device)
        step = _chunk(v)
        for s in range(0, n, step):
            z = torch.nn.functional.linear(hidden[s : s + step], weight, bias).to(acc) * inv_t  # (c, V)
            lse[s : s + step] = torch.logsumexp(z, dim=-1)
            logp[s : s + step] = z.gather(-1, targets[s : s + step, None]).squeeze(-1) - lse[s : s + step]
            if want_entropy:
                prob = torch.exp(z - lse[s : s + step, None])
                ent[s : s + step] = lse[s : s + step] - (prob * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.inv_t = inv_t
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp: Tensor, _g_ent: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        n, v = hidden.shape[0], weight.shape[0]
        acc, inv_t = lse.dtype, ctx.inv_t
        g_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        g_bias = torch.zeros(v, dtype=acc, device=weight.device) if bias is not None else None
        w = weight.to(acc)
        step = _chunk(v)
        for s in range(0, n, step):
            h = hidden[s : s + step]
            z = torch.nn.functional.linear(h, weight, bias).to(acc) * inv_t
            g = g_logp[s : s + step, None].to(acc)  # (c, 1)
            d = -torch.exp(z - lse[s : s + step, None]) * g  # d logp / d z = onehot - softmax
            d.scatter_add_(-1, targets[s : s + step, None], g)
            d *= inv_t  # z = raw logits / temperature
            if g_hidden is not None:
                g_hidden[s : s + step] = (d @ w).to(hidden.dtype)
            g_weight.addmm_(d.t(), h.to(acc))
            if g_bias is not None:
                g_bias += d.sum(0)
        return (g_hidden, g_weight.to(weight.dtype), None if g_bias is None else g_bias.to(bias.dtype), None, None,
                None)  # fmt: skip


_SCALED_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _plain_head(model: PreTrainedModel) -> torch.nn.Linear | None:
    """The model's output layer if logits are exactly ``lm_head(hidden)`` (every supported MoE family); else None."""
    head = getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear or any(getattr(model.config, a, None) for a in _SCALED_HEAD):
        return None
    return head


class _HiddenOnly(torch.nn.Module):
    """Stands in for the output layer during a forward: keeps its input, returns no logits."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.hidden = x
        return x.new_zeros(*x.shape[:-1], 1)


def response_log_probs(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    *,
    entropy: bool = True,
    temperature: float = 1.0,
    **forward_kwargs,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Log-prob of each of the last ``response_len`` tokens ``(B, T)`` (float32), their entropy ``(B, T)``
    (no graph) and the model's MoE aux loss if it returned one, under softmax(logits / temperature): the
    distribution the sampler draws from at that temperature (as TRL and verl score rollouts).

    The output layer runs only at the T positions that score the response, chunk by chunk inside
    :class:`_FusedHeadLogProb`: no tensor of size ``(B, T, V)``, let alone ``(B, S, V)``, is ever held,
    in the forward or the backward. (A model whose logits are not a plain ``lm_head`` of the hidden
    states falls back to ``logits_to_keep``: the response positions' logits, once.)
    """
    t = response_len
    b = input_ids.shape[0]
    targets = input_ids[:, -t:]  # (B, T)
    head = _plain_head(model)
    if head is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=t + 1, **forward_kwargs)
        lsm = torch.log_softmax(out.logits[:, :-1].float() / temperature, dim=-1)  # (B, T, V)
        logp = lsm.gather(-1, targets[..., None]).squeeze(-1)
        ent = -(lsm.detach().exp() * lsm.detach()).sum(-1) if entropy else None
        return logp, ent, getattr(out, "aux_loss", None)
    capture = _HiddenOnly()
    model.lm_head = capture
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=t + 1, **forward_kwargs)
    finally:
        model.lm_head = head
    hidden = capture.hidden[:, :-1]  # (B, T, H): position P-1+i scores response token i
    logp, ent = _FusedHeadLogProb.apply(hidden.reshape(b * t, -1), head.weight, head.bias, targets.reshape(-1),
                                        entropy, float(temperature))  # fmt: skip
    return logp.float().view(b, t), ent.float().view(b, t) if entropy else None, getattr(out, "aux_loss", None)
