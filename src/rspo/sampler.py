"""Generation behind a small interface: a :class:`Sampler` returns one response per prompt and what it
recorded while generating (the sampled tokens' log-probs; an engine may record more per token).

    gen = HFSampler(policy).sample([task.prompt(x) for x in examples], max_new_tokens=1024, seed=0)
    gen.sequences, gen.response_mask, gen.texts, gen.logprobs
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from rspo.policy import Policy
from rspo.prompts import Prompt

Tensor = torch.Tensor


@dataclass
class Generation:
    """Token-level result of sampling one response per prompt.

    sequences: ``(B, P + T)`` prompt (left-padded to P) then response (right-padded to T with pad).
    attention_mask: ``(B, P + T)``.  prompt_len: P.  response_mask: ``(B, T)`` 1 on response tokens,
    up to and including the stop token (or the last token of a stop string).  texts: decoded responses
    (special tokens removed).  logprobs: ``(B, T)`` float32, the sampler's own log-probs of the response
    tokens under softmax(logits / temperature) (before top-p, as the trainer scores them), 0 after the
    response; None for greedy decoding. An engine that reports them makes rollout correction possible.
    routed_experts: ``(B, P + T - 1, L, k)`` the experts the sampler's model routed each input position to, per
    MoE layer (vLLM's layout: row i is input position i; the last sampled token is never an input), in the
    smallest integer dtype; with ``record_routing`` only (rollout routing replay, R3).
    """

    sequences: Tensor
    attention_mask: Tensor
    prompt_len: int
    response_mask: Tensor
    texts: list[str]
    logprobs: Tensor | None = None
    routed_experts: Tensor | None = None


class _FinishRecorder(StoppingCriteria):
    """Marks a sequence done at a stop id or once a stop string appears in its response, and records its
    response length (the stop token, or the token that completed the stop string, included).

    Stop strings are matched on the decoded text of the newest tokens (enough of them to hold the longest
    string), for any tokenizer; an occurrence is found at the step that completes it.
    """

    def __init__(
        self,
        stop_ids: Sequence[int],
        stop_strings: Sequence[str],
        tokenizer,
        batch: int,
        prompt_len: int,
        device: torch.device,
    ) -> None:
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
        record_routing: bool = False,
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
        self._routers = None

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
        record_routing: bool = False,
    ) -> Generation:
        """One response per prompt; ``record_routing``: also each input position's experts per MoE layer,
        recorded by router hooks during the prefill and every decode step (``Generation.routed_experts``)."""
        pol = self.policy
        ids, am = pol.encode(prompts)  # (B, P)
        b, p = ids.shape
        rec = _FinishRecorder(pol.stop_ids, stop_strings, pol.tokenizer, b, p, pol.device)
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            num_beams=1,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None if greedy else 0,
            eos_token_id=list(pol.stop_ids),
            pad_token_id=pol.pad_id,
        )
        if seed is not None:
            torch.manual_seed(seed)
        logp_rec = None if greedy else _LogProbRecorder(temperature)
        was_training = pol.model.training
        pol.model.eval()
        routing = self._routing_capture() if record_routing else contextlib.nullcontext()
        try:
            with routing as routed:
                out = pol.model.generate(
                    input_ids=ids,
                    attention_mask=am,
                    generation_config=cfg,
                    stopping_criteria=StoppingCriteriaList([rec]),
                    logits_processor=LogitsProcessorList([logp_rec] if logp_rec else []),
                )
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
        texts = pol.tokenizer.batch_decode(
            [r[:n] for r, n in zip(resp.tolist(), lengths.tolist(), strict=True)], skip_special_tokens=True
        )
        experts = None
        if record_routing:
            experts = routed.trace.topk_idx  # (B, P + T - 1, L, k)
            if experts.shape[1] != p + t - 1:
                raise RuntimeError(f"recorded routing for {experts.shape[1]} positions, expected {p + t - 1}")
        return Generation(
            torch.cat([ids, resp], 1), torch.cat([am, response_mask], 1), p, response_mask, texts, logprobs, experts
        )

    def _routing_capture(self):
        """The routers' capture of every position and forward call of ``generate``, experts only."""
        from rspo.routing.capture import MoERouters

        if self._routers is None:
            self._routers = MoERouters(self.policy.model)
        return self._routers.capture(positions=None, chunks="sequence", logp=False)
