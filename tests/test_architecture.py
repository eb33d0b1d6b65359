"""The structure the code keeps (docs/architecture.md): layers whose imports only point down, no cycle, the
core free of the research tooling, and the options defined once with every engine's names in step."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rspo"

# Bottom (0) to top; a module may import only modules of its own layer or below.
LAYERS = {
    0: ["errors", "prompts", "assets"],
    1: ["config", "correction", "sandbox", "routing", "objectives"],
    2: ["options", "tasks", "scoring", "rundir"],
    3: ["policy", "sampler", "logprobs", "evaluate", "train_config"],
    4: ["trainer"],
    5: ["integrations"],
    6: ["lab"],
    7: ["cli"],
}
RANK = {name: rank for rank, names in LAYERS.items() for name in names}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``rspo.routing.step``)."""
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(path: Path, name: str) -> set[str]:
    """The rspo modules ``path`` imports, at any level (functions included), resolved to modules."""
    mods = modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rspo")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rspo") and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in mods else node.module)
    return {m for m in found if m != name and m != "rspo"}


def top(module: str) -> str:
    """The layer key of a module: its first component under rspo (``rspo.routing.step`` -> ``routing``)."""
    return module.split(".")[1] if module.count(".") else ""


def graph() -> dict[str, set[str]]:
    return {name: imports(path, name) for name, path in modules().items()}


def test_every_module_has_a_layer():
    missing = sorted({top(m) for m in modules() if m != "rspo"} - set(RANK))
    assert not missing, f"modules without a layer in this test (and docs/architecture.md): {missing}"


def test_imports_point_down():
    up = []
    for src, targets in graph().items():
        if src == "rspo":
            continue
        for dst in targets:
            if RANK[top(dst)] > RANK[top(src)]:
                up.append(f"{src} -> {dst}")
    assert not up, "imports that point up a layer:\n" + "\n".join(sorted(up))


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (cycle := visit(n)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_core_imports_nothing_from_the_lab():
    bad = [
        f"{s} -> {d}"
        for s, ds in graph().items()
        for d in ds
        if d.startswith("rspo.lab") and not s.startswith(("rspo.lab", "rspo.cli"))
    ]
    assert not bad, bad


def test_trl_fields_are_the_router_shift_options():
    """RSPOConfig's flat fields are exactly rspo.options' router-shift options, with the same types and
    defaults (the one list every engine follows)."""
    import typing

    from rspo.integrations.trl import RSPO_FIELDS, RSPOConfig, _trl_field
    from rspo.options import RouterShiftOptions, router_shift_fields

    want = {_trl_field(k) for k in router_shift_fields()}
    have = {f for f in RSPO_FIELDS if f == "router_shift" or f.startswith("router_shift_")}
    assert have == want
    hints_trl, hints_opt = typing.get_type_hints(RSPOConfig), typing.get_type_hints(RouterShiftOptions)
    defaults = {f.name: f.default for f in dataclasses.fields(RSPOConfig)}
    for k in router_shift_fields():
        assert hints_trl[_trl_field(k)] == hints_opt[k], k
        assert defaults[_trl_field(k)] == getattr(RouterShiftOptions(), k), k


def test_verl_keys_are_the_router_shift_options():
    from rspo.integrations.verl import SECTION_KEYS
    from rspo.options import router_shift_fields

    shift = {"router_shift" if k == "enabled" else k for k in router_shift_fields()}
    assert set(SECTION_KEYS) == shift | {"objective", "routing_control", "rollout_weights_reduce"}


def test_every_router_shift_option_works_in_trl_or_is_named():
    """The options the first TRL adapter lacked (clip_threshold, clip_drop) reach the loss; errors name
    RSPOConfig's own fields."""
    from rspo.errors import ConfigError
    from rspo.integrations.trl import RSPOConfig

    base = {"output_dir": "unused", "use_cpu": True, "bf16": False, "report_to": []}
    args = RSPOConfig(
        **base, router_shift_clip_threshold=0.9, router_shift_clip_drop=True, router_shift_form="eq5_literal"
    )
    hp = args.objective_hparams()
    assert (hp["router_clip_threshold"], hp["router_clip_drop"], hp["router_shift_form"]) == (0.9, True, "eq5_literal")
    with pytest.raises(ConfigError, match=r"router_shift_clip_drop: needs clip_threshold"):
        RSPOConfig(**base, router_shift_clip_drop=True)
    with pytest.raises(ConfigError, match=r"router_shift_gamma_min: must be in \(0, 1\]"):
        RSPOConfig(**base, router_shift_gamma_min=0.0)
    with pytest.raises(ConfigError, match=r"router_shift=false: objective 'rspo' needs router shift"):
        RSPOConfig(**base, router_shift=False)
    with pytest.raises(ConfigError, match=r"router_shift_placement set but router shift is off for 'grpo'"):
        RSPOConfig(**base, objective="grpo", router_shift_placement="before_clip")
