"""Megatron-Core 0.16.x on CPU, for the adapter's tests only (never imported by the library).

Megatron-Core assumes CUDA in a few places that a tiny GPTModel with MoE layers reaches on CPU. Each patch
below names the internal it replaces and checks at import that the internal still looks as expected, so a
Megatron release that moves one fails here by name instead of silently testing something else:

1. ``moe_utils.te_general_gemm``: never defined when Transformer Engine is absent, yet tested against None by
   ``RouterGatingLinearFunction`` (a NameError): defined as None.
2. ``Router.gating`` moves the router weight to ``torch.cuda.current_device()`` when it is on CPU: replaced by
   the same computation without the move.
3. ``tensor_parallel.random``: the CUDA RNG tracker (attention dropout forks it even at p=0) and the CUDA RNG
   state functions ``CheckpointFunction`` (activation recompute) saves and restores: CPU stand-ins.
4. ``megatron.core.jit``: ``jit_fuser`` is ``torch.compile``; disabled (no inductor on this CPU).
5. ``utils.GlobalMemoryBuffer.get_tensor`` (attention's scratch buffer) allocates on
   ``torch.cuda.current_device()``: the same on CPU.
6. ``torch_norm.WrappedTorchNorm`` (the local spec's norm) refuses ``sequence_parallel`` (Apex and Transformer
   Engine norms support it): the same torch norm, its parameters marked ``sequence_parallel`` as Megatron's own
   norms mark them (their gradients are then summed over the tensor-parallel group by Megatron's finalize step,
   which these tests do not run).
7. ``tensor_parallel.mappings`` (the sequence-parallel gathers and scatters) and ``tensor_parallel.layers`` (the
   parallel linears' backward under sequence parallelism) allocate on ``torch.cuda.current_device()``: those two
   modules see a ``torch`` whose ``cuda.current_device()`` is ``"cpu"``.
8. ``utils.get_default_causal_mask`` builds its mask on ``cuda``: the tests pass an explicit attention mask.

The model: the local layer spec (no Transformer Engine), learned absolute positions (rotary embedding moves to
cuda), the allgather dispatcher (alltoall creates a CUDA stream), SequentialMLP experts, float32 or float64,
``use_cpu_initialization=True``, a gloo process group of world size 1.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import socket
from typing import Any

import torch


class MegatronInternalMoved(RuntimeError):
    """A Megatron-Core internal the CPU harness patches is not where or what it was."""


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise MegatronInternalMoved(f"Megatron-Core CPU harness: {what} (the patch for it needs updating)")


def _src(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


class _NullTracker:
    """The CUDA RNG tracker's interface with CPU semantics (fork draws from the default generator)."""

    def reset(self) -> None: ...

    def get_states(self) -> dict:
        return {}

    def set_states(self, states: dict) -> None: ...

    def add(self, name: str, seed: int) -> None: ...

    def is_initialized(self) -> bool:
        return True

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        yield


class _CpuCuda:
    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"


class _CpuTorch:
    """``torch`` for one Megatron module, with ``torch.cuda.current_device()`` on CPU."""

    cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_PATCHED = False


def patch() -> None:
    """Apply the CPU patches (idempotent). Import order matters: jit first."""
    global _PATCHED
    if _PATCHED:
        return
    import megatron.core.jit as jit

    _expect(hasattr(jit, "jit_fuser"), "megatron.core.jit.jit_fuser is gone")
    if hasattr(jit, "disable_jit_fuser"):
        jit.disable_jit_fuser()
    else:  # the decorator is read at import time by the modules below
        jit.jit_fuser = lambda fn: fn

    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils, router

    # 1. te_general_gemm
    _expect(
        "te_general_gemm is not None" in _src(moe_utils.RouterGatingLinearFunction),
        "moe_utils.RouterGatingLinearFunction no longer tests te_general_gemm",
    )
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # 2. Router.gating
    gating_src = _src(router.Router.gating)
    _expect(
        "torch.cuda.current_device()" in gating_src and "router_gating_linear(" in gating_src,
        "Router.gating no longer moves the weight to cuda and calls router_gating_linear",
    )

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        return moe_utils.router_gating_linear(input, self.weight, self.bias, dtype)

    router.Router.gating = gating

    # 3. the CUDA RNG tracker and state functions
    for name in ("get_cuda_rng_tracker", "_get_all_rng_states", "_set_all_rng_states"):
        _expect(hasattr(tp_random, name), f"tensor_parallel.random.{name} is gone")
    tracker = _NullTracker()
    tp_random.get_cuda_rng_tracker = lambda *a, **k: tracker
    import megatron.core.tensor_parallel as tp

    tp.get_cuda_rng_tracker = tp_random.get_cuda_rng_tracker
    for mod in _modules_importing("get_cuda_rng_tracker"):
        mod.get_cuda_rng_tracker = tp_random.get_cuda_rng_tracker
    tp_random._get_all_rng_states = lambda: (torch.get_rng_state(), None, tracker.get_states())
    tp_random._set_all_rng_states = lambda cpu, cuda, tracker_states, *a, **k: torch.set_rng_state(cpu)

    # 5. the global memory buffer
    from megatron.core import utils

    _expect(
        "device=torch.cuda.current_device()" in _src(utils.GlobalMemoryBuffer.get_tensor),
        "utils.GlobalMemoryBuffer.get_tensor no longer allocates on torch.cuda.current_device()",
    )

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        n = math.prod(tensor_shape)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self.buffer[(name, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(*tensor_shape)

    utils.GlobalMemoryBuffer.get_tensor = get_tensor

    # 6. the torch norm under sequence parallelism
    from megatron.core.transformer import torch_norm

    _expect(
        "sequence parallel not supported" in _src(torch_norm.WrappedTorchNorm.__new__),
        "torch_norm.WrappedTorchNorm no longer refuses sequence_parallel",
    )
    refuse = torch_norm.WrappedTorchNorm.__new__

    def wrapped_norm(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return refuse(cls, config, hidden_size, eps, *args, **kwargs)
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = wrapped_norm

    # 7. the tensor-parallel mappings' and linears' buffers
    from megatron.core.tensor_parallel import layers, mappings

    for mod in (mappings, layers):
        _expect(
            "device=torch.cuda.current_device()" in _src(mod),
            f"{mod.__name__} no longer allocates on torch.cuda.current_device()",
        )
        mod.torch = _CpuTorch()
    _PATCHED = True


def _modules_importing(name: str) -> list:
    import sys

    return [m for k, m in list(sys.modules.items()) if k.startswith("megatron.core") and hasattr(m, name)]


def init_single_process() -> None:
    """A gloo process group of world size 1 and Megatron's model-parallel state (TP = PP = EP = 1)."""
    from megatron.core import parallel_state

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def tiny_config(**overrides: Any):
    """A TransformerConfig for the tiny MoE GPT: 2 layers, hidden 64, 8 experts, top-2 (overrides win)."""
    from megatron.core.transformer import TransformerConfig

    kw: dict[str, Any] = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        moe_ffn_hidden_size=32,
        num_moe_experts=8,
        moe_router_topk=2,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_aux_loss_coeff=0.0,
        moe_router_load_balancing_type="none",
        use_cpu_initialization=True,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=False,
        params_dtype=torch.float32,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def tiny_gpt(config=None, vocab_size: int = 48, max_len: int = 32, seed: int = 0, dtype=torch.float32):
    """The tiny MoE GPTModel on CPU (``config`` from :func:`tiny_config`), its weights in ``dtype``."""
    patch()
    init_single_process()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = config or tiny_config()
    torch.manual_seed(seed)
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_len,
        position_embedding_type="learned_absolute",
    )
    return model.to(dtype)


def causal_mask(batch: int, seq: int) -> torch.Tensor:
    """Megatron's attention mask convention: True = masked out, ``(B, 1, S, S)``."""
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).expand(batch, 1, seq, seq)


def forward(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, S, V)`` of ``input_ids`` ``(B, S)``."""
    b, s = input_ids.shape
    pos = torch.arange(s).expand(b, s)
    return model(input_ids=input_ids, position_ids=pos, attention_mask=causal_mask(b, s))
