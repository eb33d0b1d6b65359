"""verl 0.9.1's real ``python -m verl.trainer.main_ppo`` with the rspo plugin, end to end on CPU
(``make test-verl-e2e``): Ray workers, the HF rollout replica, the reward loop with rspo's Countdown
verdicts (``pkg://rspo.integrations.verl_reward``), GRPO advantages, the old-log-prob pass, two mini-batches
per rollout batch, the weight sync back to the rollout, checkpoints, two gloo ranks.

Each run is one ``main_ppo`` process (about a minute and a half here), made once per session and shared by
the tests that read it (about 8-10 minutes in all here). Every command comes from recipe.py, the source of
docs/verl-recipe.md."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("RSPO_VERL_E2E") == "1":  # make test-verl-e2e: a missing package is a failure, not a skip
    import transfer_queue  # noqa: F401
    import verl.trainer.main_ppo  # noqa: F401
else:
    pytest.importorskip("verl.trainer.main_ppo", reason="make test-verl-e2e installs verl and its run dependencies")
    pytest.importorskip("transfer_queue", reason="make test-verl-e2e installs tests/verl_e2e/requirements.txt")

from rspo.integrations import verl as rv
from tests.naive import verl_loss_from_dump
from tests.verl_e2e import recipe

MINI_BATCHES = 2  # 8 prompts per step, mini-batches of 4
ROUTER_KEYS = ("actor/router/gamma_mean", "actor/router/gamma_min", "actor/router/non_shifted_ratio")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return recipe.prepare(tmp_path_factory.mktemp("verl_e2e"), python=sys.executable)


class Runs:
    """Each run made on first use, once."""

    def __init__(self, workdir: Path) -> None:
        self.dir, self.done = workdir, {}

    def get(self, name: str) -> recipe.Run:
        if name not in self.done:
            self.done[name] = self._make(name)
        return self.done[name]

    def _cmd(self, **kw) -> recipe.Command:
        d = self.dir
        return recipe.cpu_command(str(d / "data"), str(d / "model"), python=sys.executable, **kw)

    def _make(self, name: str) -> recipe.Run:
        d = self.dir
        if name == "grpo":  # plain verl: no plugin section
            return recipe.run(self._cmd(objective=None, out=str(d / "ckpt-grpo")), d, name)
        if name == "rspo":  # two ranks, a checkpoint every step
            cmd = self._cmd(ranks=2, out=str(d / "ckpt-rspo"), extra=("trainer.save_freq=1",))
            return recipe.run(cmd, d, name, dump=True)
        if name == "rspo-resume-r3":  # the same run continued from its last checkpoint to step 3, now with R3
            self.get("rspo")
            cmd = self._cmd(
                ranks=2,
                steps=3,
                out=str(d / "ckpt-rspo"),
                rspo_keys={"routing_control": "replay_rollout"},
                extra=("trainer.resume_mode=auto", "actor_rollout_ref.rollout.enable_rollout_routing_replay=true"),
            )
            return recipe.run(cmd, d, name, dump=True)
        if name == "legacy":  # verl's legacy trainer with the plugin section
            return recipe.run(self._cmd(out=str(d / "ckpt-legacy"), extra=("trainer.use_v1=false",)), d, name)
        raise KeyError(name)


@pytest.fixture(scope="session")
def runs(workdir) -> Runs:
    return Runs(workdir)


def finished(run: recipe.Run, steps: list[int]) -> None:
    assert run.returncode == 0, f"main_ppo exited {run.returncode}:\n{run.tail()}"
    assert sorted(run.metrics) == steps, f"logged steps {sorted(run.metrics)}:\n{run.tail()}"


def mini_batches(dumps: list[dict]) -> dict[int, list[list[dict]]]:
    """Per rank, its loss calls grouped into mini-batches: consecutive calls whose rows add up to the rank's
    share of verl's global mini-batch (``global_batch_size / dp_size`` sequences)."""
    out: dict[int, list[list[dict]]] = {}
    for d in dumps:
        groups = out.setdefault(d["rank"], [[]])
        per_rank = d["info"]["global_batch_size"] // int(d["info"]["dp_size"])
        if sum(g["mask"].shape[0] for g in groups[-1]) == per_rank:
            groups.append([])
        groups[-1].append(d)
    for rank, groups in out.items():
        for g in groups:
            rows = sum(c["mask"].shape[0] for c in g)
            assert rows == g[0]["info"]["global_batch_size"] // int(g[0]["info"]["dp_size"]), (rank, rows)
    return out


def gammas(group: list[dict]) -> torch.Tensor:
    return torch.cat([c["gamma"][c["mask"] > 0] for c in group])


# ------------------------------------------------------------------------------------------------- GRPO
def test_plain_verl_grpo_runs(runs):
    run = runs.get("grpo")
    finished(run, [1, 2])
    assert not any(k.startswith("actor/router/") for k in run.metrics[2])  # no plugin section, no plugin
    assert math.isfinite(run.metrics[2]["actor/pg_loss"])
    assert 0 <= run.metrics[1]["critic/score/mean"] <= 1  # rspo's Countdown verdicts through verl's reward loop


# ------------------------------------------------------------------------------------------------- RSPO
def test_rspo_runs_on_two_ranks_and_logs_router_metrics(runs):
    run = runs.get("rspo")
    finished(run, [1, 2])
    for step in (1, 2):
        for key in ROUTER_KEYS:
            assert key in run.metrics[step], f"{key} not logged at step {step}"
    assert {d["rank"] for d in run.dumps} == {0, 1}
    assert all(int(d["info"]["dp_size"]) == 2 for d in run.dumps)


def test_gamma_is_one_on_policy_and_below_one_off_policy(runs):
    """The first mini-batch of a rollout batch is trained by the policy that sampled it: gamma is exactly 1;
    after one optimizer step the router has moved for the second mini-batch."""
    groups = mini_batches(runs.get("rspo").dumps)
    for rank, mbs in groups.items():
        assert len(mbs) == 2 * MINI_BATCHES, (rank, len(mbs))
        for i, mb in enumerate(mbs):
            g = gammas(mb)
            if i % MINI_BATCHES == 0:
                assert torch.equal(g, torch.ones_like(g)), f"rank {rank} mini-batch {i}: gamma != 1 on-policy"
            else:
                assert float(g.min()) < 1.0, f"rank {rank} mini-batch {i}: gamma == 1 off-policy"
                assert float(g.min()) >= 0.5  # the floor


def test_logged_loss_equals_rspo_recomputed_from_the_dumped_batch(runs):
    """Each loss call recomputed with the naive loops (float64) from what verl handed the plugin; verl's
    logged ``actor/pg_loss`` is the mean over mini-batches and ranks of the summed micro-batch losses."""
    run = runs.get("rspo")
    groups = mini_batches(run.dumps)
    for d in run.dumps:
        gamma, raw, scaled = verl_loss_from_dump(d)
        valid = d["mask"] > 0
        ref = torch.tensor(gamma, dtype=torch.float64)[valid]
        torch.testing.assert_close(d["gamma"][valid].double(), ref, atol=1e-6, rtol=0)
        assert abs(float(d["loss"]) - raw) < 1e-6, (d["rank"], d["call"], float(d["loss"]), raw)
        assert abs(float(d["policy_loss"]) - scaled) < 1e-6
    dp = len(groups)
    for step in (1, 2):
        calls = [c for mbs in groups.values() for mb in mbs[(step - 1) * 2 : step * 2] for c in mb]
        expected = sum(verl_loss_from_dump(c)[2] for c in calls) / (MINI_BATCHES * dp)
        assert abs(run.metrics[step]["actor/pg_loss"] - expected) < 1e-6, (step, run.metrics[step]["actor/pg_loss"])


def test_router_metrics_are_reduced_across_ranks(runs):
    """``actor/router/tokens`` is each loss call's count of response tokens; verl averages the calls of both
    ranks and both mini-batches: the logged value is that mean over every call of the step."""
    run = runs.get("rspo")
    groups = mini_batches(run.dumps)
    for step in (1, 2):
        calls = [c for mbs in groups.values() for mb in mbs[(step - 1) * 2 : step * 2] for c in mb]
        per_rank = {
            r: sum(int((c["mask"] > 0).sum()) for mb in mbs[(step - 1) * 2 : step * 2] for c in mb)
            for r, mbs in groups.items()
        }
        assert min(per_rank.values()) > 0 and len(per_rank) == 2
        expected = sum(int((c["mask"] > 0).sum()) for c in calls) / len(calls)
        assert abs(run.metrics[step]["actor/router/tokens"] - expected) < 1e-9, (step, per_rank)


def test_checkpoint_resume_continues_the_run(runs):
    """Saved at steps 1 and 2, resumed with trainer.resume_mode=auto: step 3 only, from the step-2 shards."""
    first = runs.get("rspo")
    finished(first, [1, 2])
    ckpt = runs.dir / "ckpt-rspo"
    assert (ckpt / "global_step_1").is_dir() and (ckpt / "global_step_2").is_dir()
    run = runs.get("rspo-resume-r3")
    finished(run, [3])  # steps 1 and 2 are not trained again
    step2 = ckpt / "global_step_2"
    assert f"Resuming from {step2}, setting global step to 2" in run.log
    for rank in (0, 1):  # both ranks restored their model and optimizer shards
        for what, file in (("model", "model"), ("optimizer", "optim")):
            assert f"Loaded {what} from {step2}/actor/{file}_world_size_2_rank_{rank}.pt" in run.log
    for key in ROUTER_KEYS:
        assert key in run.metrics[3]
    groups = mini_batches(run.dumps)  # the plugin re-armed on the restored workers (gamma at the replayed experts)
    for mbs in groups.values():
        assert len(mbs) == MINI_BATCHES
        g0, g1 = gammas(mbs[0]), gammas(mbs[1])
        assert torch.equal(g0, torch.ones_like(g0)) and float(g1.min()) < 1.0
    assert first.metrics[2]["training/global_step"] == 2 and run.metrics[3]["training/global_step"] == 3


# ------------------------------------------------------------------------------------------------- R3
def test_rspo_with_rollout_routing_replay_on_two_ranks(runs):
    """The resumed step runs with R3 (a run's config is not checkpointed; the routing control may change at a
    resume): the HF rollout returns each position's experts in vLLM's layout, and the plugin replays them in
    the old pass and the update on both ranks and reports the old router's agreement with them. GRPO+R3
    differs only by the objective (no gamma): tested at the engine level (make test-verl)."""
    run = runs.get("rspo-resume-r3")
    finished(run, [3])
    m = run.metrics[3]
    agree = [m[f"actor/router/rollout_agree_layer{layer}"] for layer in range(4)]
    assert min(agree) > 0.95, agree  # the rollout's weights and precision are the actor's: near-ties only
    assert 0 <= m["actor/router/rollout_disagree_tokens"] < 0.1
    assert {d["rank"] for d in run.dumps} == {0, 1}


# ------------------------------------------------------------------------------------------------- legacy
def test_legacy_trainer_with_the_plugin_fails_naming_the_v1_trainer(runs):
    run = runs.get("legacy")
    assert run.returncode != 0
    assert rv.LEGACY_TRAINER_ERROR in run.log, run.tail()
    assert "step:1 -" not in run.log  # stopped before training
