"""Run verl 0.9.1's ``python -m verl.trainer.main_ppo`` (v1 trainer, FSDP2 engine) on CPU: a test-only shim.

Load it in every process of the run (driver, task runner, every Ray worker) through verl's own hook:

    VERL_USE_EXTERNAL_MODULES=verl_cpu  PYTHONPATH=tests/verl_e2e:$PYTHONPATH  python -m verl.trainer.main_ppo ...

(the whole command: ``python tests/verl_e2e/recipe.py cpu``, or docs/verl-recipe.md). Nothing of rspo's
plugin depends on it: a GPU run does not load it.

(``verl/__init__.py`` imports each module named there, after ``verl.protocol`` and before the trainer and
worker modules: Ray workers inherit the driver's environment, so they import it too.) What it does, one
numbered section per CPU blocker:

1. a ``cpu`` platform for verl's platform registry (torch device ``cpu``, collective backend ``gloo``);
2. its Ray resource stays ``GPU``: the run passes fake GPUs, ``+ray_kwargs.ray_init.num_gpus=N``;
3. the worker process group is plain ``gloo`` (verl builds ``cpu:gloo,<device>:<backend>``);
4. the FSDP engine (registered for cuda and npu only) is looked up as ``cuda`` (``VERL_ENGINE_DEVICE``);
5. (config only) ``attn_implementation=sdpa``, ``strategy=fsdp2`` and fp32 ``mixed_precision`` (recipe.py);
6. an HF ``generate`` rollout, ``actor_rollout_ref.rollout.name=hf``: one Ray actor per replica, per-token
   (processed) log-probs as verl's vLLM server returns them, and with
   ``rollout.enable_rollout_routing_replay`` each position's experts as vLLM returns them (R3), recorded
   during generation by rspo's router capture;
7. (packages/config) requirements.txt here; one TransferQueue storage unit;
8. the HF rollout fuses verl's per-expert weights back into transformers' packed expert tensors (else its
   experts would silently stay at their initial weights).

The verl internals it patches or registers into are checked when it is imported: a changed verl fails
here with a message naming the internal, not later and silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import sys

import ray
import torch
from verl.plugin.platform import platform_manager
from verl.plugin.platform.platform_base import PlatformBase


def _expect(ok: bool, internal: str, what: str) -> None:
    if not ok:
        raise RuntimeError(f"verl CPU shim: {internal} is not as expected ({what}); the shim targets verl 0.9.1")


# --- 1. a CPU platform ---------------------------------------------------------------------------------
class _TorchCPU:
    """``torch.cpu`` plus the ``torch.cuda`` calls verl makes through ``get_torch_device()``, as CPU no-ops."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    empty_cache = ipc_collect = set_per_process_memory_fraction = staticmethod(lambda *a, **k: None)
    memory_allocated = memory_reserved = max_memory_allocated = max_memory_reserved = staticmethod(lambda *a, **k: 0)
    mem_get_info = staticmethod(
        lambda *a, **k: (os.sysconf("SC_AVPHYS_PAGES") * 4096, os.sysconf("SC_PHYS_PAGES") * 4096)
    )
    get_rng_state = staticmethod(lambda *a, **k: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *a, **k: torch.set_rng_state(state))
    manual_seed = manual_seed_all = staticmethod(torch.manual_seed)
    get_device_name = staticmethod(lambda *a, **k: "cpu")


@platform_manager.PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    device_name = vendor_name = "cpu"
    device_module = _TorchCPU()

    def is_available(self):
        return True

    def current_device(self):
        return "cpu"  # verl does `tensor.to(get_device_id())`: an int would mean cuda:<int>

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return None, None

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CUDA_VISIBLE_DEVICES"  # Ray sets it for the fake GPUs (2): harmless on CPU

    @contextlib.contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self):
        pass

    profiler_stop = profiler_start

    # --- 2. Ray: verl's resource pools always ask for the platform's accelerator (use_gpu=True);
    # keep it "GPU" and start Ray with fake GPUs (ray_kwargs.ray_init.num_gpus)
    def ray_resource_name(self):
        return "GPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


_expect(platform_manager._current_platform is None, "verl.plugin.platform.get_platform", "already resolved")
platform_manager.set_platform(PlatformCPU())


# --- 3. process group: verl asks for f"cpu:gloo,{device}:{backend}" = "cpu:gloo,cpu:gloo", which torch rejects
import verl.utils.distributed as _dist  # noqa: E402

_expect(
    'f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"'
    in inspect.getsource(_dist.initialize_global_process_group_ray),
    "verl.utils.distributed.initialize_global_process_group_ray",
    "default backend string",
)
_expect("verl.workers.engine_workers" not in sys.modules, "verl.workers.engine_workers", "imported before the shim")
_init_pg = _dist.initialize_global_process_group_ray


def initialize_global_process_group_ray(timeout_second=None, backend=None):
    return _init_pg(timeout_second=timeout_second, backend=backend or "gloo")


_dist.initialize_global_process_group_ray = initialize_global_process_group_ray  # engine_workers imports it by name

# --- 4. the FSDP engine is registered for device cuda/npu only: verl's own override names the cuda one
from verl.workers.engine import base as _engine_base  # noqa: E402

_expect(
    "VERL_ENGINE_DEVICE" in inspect.getsource(_engine_base.EngineRegistry.get_engine_cls),
    "verl.workers.engine.base.EngineRegistry.get_engine_cls",
    "the VERL_ENGINE_DEVICE override",
)
os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")


# --- 6. the HF generate rollout ------------------------------------------------------------------------
from verl.workers.rollout import base as _rollout_base  # noqa: E402
from verl.workers.rollout import replica as _replica  # noqa: E402

_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


_nothing = contextlib.nullcontext


def _server_name(replica_rank: int) -> str:
    return f"hf_server_{replica_rank}"


class HFServer:
    """One rollout replica: an HF model on CPU serving verl's token-in-token-out ``generate``."""

    def __init__(self, config, model_config, replica_rank: int):
        from transformers import AutoModelForCausalLM

        from rspo.routing.capture import MoERouters

        torch.set_num_threads(1)
        self.config, self.global_steps = config, None
        path = model_config.get("local_path") or model_config["path"]  # a DictConfig here, not HFModelConfig
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
        self.eos = self.model.generation_config.eos_token_id
        self.pad = self.model.generation_config.pad_token_id
        self._routers = MoERouters(self.model) if config.enable_rollout_routing_replay else None
        self._lock = asyncio.Lock()

    async def generate(self, prompt_ids, sampling_params, request_id, image_data=None, video_data=None, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        _expect(image_data is None and video_data is None, "HFServer.generate", "text only")
        p = dict(sampling_params)
        c = self.config
        max_tokens = p.pop("max_tokens", p.pop("max_new_tokens", None)) or min(
            c.response_length, c.prompt_length + c.response_length - len(prompt_ids)
        )
        async with self._lock:  # one request at a time; keeps the actor responsive to control calls
            ids, logps, experts = await asyncio.to_thread(self._generate, list(prompt_ids), max_tokens, p)
        return TokenOutput(
            token_ids=ids,
            log_probs=logps if p.get("logprobs") else None,
            routed_experts=experts,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    @torch.no_grad()
    def _generate(self, prompt_ids, max_tokens, p):
        temperature = float(p.get("temperature", 1.0))
        sample = temperature > 0
        top_k = int(p.get("top_k", -1))
        record = bool(self.config.enable_rollout_routing_replay)
        with self._routers.capture(positions=None, chunks="sequence", logp=False) if record else _nothing() as routed:
            out = self._hf_generate(prompt_ids, max_tokens, p, sample, temperature, top_k)
        ids = out.sequences[0, len(prompt_ids) :].tolist()
        logps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, ids, strict=True)]
        experts = None
        if record:  # vLLM's layout: (prompt + response - 1, layers, k), the last token is never an input
            experts = routed.trace.topk_idx[0].to(torch.int16).numpy()
            _expect(experts.shape[0] == len(prompt_ids) + len(ids) - 1, "HFServer routing", "one row per input")
        return ids, logps, experts

    def _hf_generate(self, prompt_ids, max_tokens, p, sample, temperature, top_k):
        return self.model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=float(p.get("top_p", 1.0)) if sample else None,
            top_k=(top_k if top_k > 0 else 0) if sample else None,
            repetition_penalty=float(p.get("repetition_penalty", 1.0)),
            eos_token_id=self.eos,
            pad_token_id=self.pad,
            return_dict_in_generate=True,
            output_scores=True,  # the processed logits (temperature, top-k/p): vLLM's "processed_logprobs"
        )

    async def update_weights(self, weights: dict, global_steps=None):
        """Load verl's weights; fuse its per-expert tensors (8) into transformers' packed experts."""
        params = dict(self.model.named_parameters())
        seen = set()
        for name, tensor in weights.items():
            m = _EXPERT.match(name)
            if m:
                prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
                if proj == "down_proj":
                    key, rows = f"{prefix}.down_proj", slice(None)
                else:
                    key = f"{prefix}.gate_up_proj"
                    half = params[key].shape[1] // 2
                    rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
                params[key].data[e, rows].copy_(tensor)
                seen.add(key)
            elif name in params:
                params[name].data.copy_(tensor)
                seen.add(name)
            elif not (name == "lm_head.weight" and self.model.config.tie_word_embeddings):
                raise KeyError(f"HF rollout: verl sent {name!r}, not a parameter of the rollout model")
        missing = sorted(set(params) - seen)
        _expect(not missing, "FSDP engine get_per_tensor_param", f"no weights for {missing[:4]}")
        self.global_steps = global_steps
        return len(weights)

    async def _noop(self, *args, **kwargs):
        return {}

    wake_up = sleep = clear_kv_cache = release_kv_cache = resume_kv_cache = resume_generation = _noop
    abort_all_requests = start_profile = stop_profile = wait_for_requests_to_drain = _noop

    async def set_global_steps(self, global_steps):
        self.global_steps = global_steps


class HFReplica(_replica.RolloutReplica):
    """verl's rollout replica for ``rollout.name=hf``: one CPU Ray actor, no GPU of its own."""

    async def launch_servers(self):
        name = _server_name(self.replica_rank) + self.name_suffix
        server = (
            ray.remote(HFServer)
            .options(name=name, num_cpus=0, max_concurrency=self.max_concurrency)
            .remote(self.config, self.model_config, self.replica_rank)
        )
        self.servers, self._server_handle, self._server_address = [server], server, name


class HFServerAdapter(_rollout_base.BaseRollout):
    """The trainer-side half (one per trainer rank): pushes the actor's full weights to its replica's server."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        c = self.config
        size = c.tensor_model_parallel_size * c.data_parallel_size * c.pipeline_model_parallel_size
        rank = int(os.environ["RANK"])
        self.replica_rank = rank // size if replica_rank == -1 else replica_rank
        self.leader = rank % size == 0

    async def resume(self, tags):
        pass

    async def release(self):
        pass

    async def update_weights(self, weights, global_steps=None, wire_format="named_tensors", **kwargs):
        _expect(wire_format == "named_tensors", "rollout.checkpoint_engine", f"wire format {wire_format}")
        state = {name: t.detach().to("cpu", copy=True) for name, t in weights}  # every rank: full_tensor gathers
        if self.leader:
            await ray.get_actor(_server_name(self.replica_rank)).update_weights.remote(state, global_steps)


_expect(hasattr(_replica, "RolloutReplicaRegistry"), "verl.workers.rollout.replica.RolloutReplicaRegistry", "missing")
_expect(
    isinstance(getattr(_rollout_base, "_ROLLOUT_REGISTRY", None), dict),
    "verl.workers.rollout.base._ROLLOUT_REGISTRY",
    "missing",
)
_replica.RolloutReplicaRegistry.register("hf", lambda: HFReplica)
_rollout_base._ROLLOUT_REGISTRY[("hf", "async")] = f"{__name__}.HFServerAdapter"
