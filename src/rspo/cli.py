"""The ``rspo`` command line: a table of commands (:data:`COMMANDS`).

A command with a config takes ``[CONFIG.yaml] field=value ...``: the config's dataclass from a YAML file plus
dotted overrides, validated before anything runs; ``rspo CMD -h`` lists every field with its type, default
and meaning. The other commands take a few flags. An input error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OVERWRITE = (
    ("--overwrite",),
    {
        "action": "store_true",
        "help": "replace this command's own earlier output in the directory (only the files it wrote; a "
        "directory it did not create is never written to)",
    },
)


@dataclass(frozen=True)
class Command:
    """One command: its help, its config dataclass (``module:Class``, imported when used: the config modules
    import transformers), its runner ``run(args, config) -> exit code`` and its extra argparse flags."""

    name: str
    help: str
    run: Callable[[argparse.Namespace, Any], int]
    config: str | None = None
    flags: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()

    def config_class(self) -> type:
        module, _, cls = (self.config or "").partition(":")
        return getattr(importlib.import_module(module), cls)

    def load(self, args: argparse.Namespace) -> Any:
        """The command's config from ``args.args``: a leading YAML path (optional), then dotted overrides."""
        from rspo.config import load_config

        items = list(args.args)
        path = items.pop(0) if items and "=" not in items[0] else None
        return load_config(self.config_class(), path, items)


# ----------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------
def _train(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.errors import ConfigError
    from rspo.lab.plots import plot_runs
    from rspo.rundir import RunDir
    from rspo.trainer import TrainingError, resume, train

    try:
        if args.resume:
            if args.overwrite:
                raise ConfigError("--resume continues a run and --overwrite replaces one: choose one")
            summary = resume(args.resume, overrides=args.args)
        else:
            summary = train(cfg, overwrite=args.overwrite)
    except TrainingError as e:
        print(f"rspo train: stopped: {e}", file=sys.stderr)
        return 3
    png = plot_runs([summary["out_dir"]], RunDir.existing(summary["out_dir"], "train").claim("curves.png"))
    collapse = "none" if summary["collapse_step"] is None else f"at step {summary['collapse_step']}"
    print(
        f"done: {summary['steps']} steps, validation accuracy last {summary['last_val']:.1%} best "
        f"{summary['best_val']:.1%}, collapse {collapse}; curves: {png}"
    )
    return 0


def _eval(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.evaluate import run_eval

    run_eval(cfg, overwrite=args.overwrite)
    return 0


def _pretrain(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.lab.pretrain import pretrain

    result = pretrain(cfg, overwrite=args.overwrite)
    print(
        f"saved {cfg.out_dir}: {result['params_total']:,} parameters ({result['params_active']:,} active), "
        f"{result['train_seconds']:.0f} s, final loss {result['final_loss']:.3f}"
    )
    if "test_greedy_acc" in result:
        print(f"test accuracy: greedy {result['test_greedy_acc']:.1%}, sampled (T=1) {result['test_sampled_acc']:.1%}")
    return 0


def _demo(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.lab.demo import run_demo

    return run_demo(cfg, overwrite=args.overwrite)


def _grid_done(status: dict[str, str], report: Path) -> int:
    failed = {k: v for k, v in status.items() if v.startswith("failed")}
    print(f"{len(status) - len(failed)} runs done, {len(failed)} failed; report: {report}")
    return 1 if failed else 0


def _study(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.lab.report import write_report
    from rspo.lab.study import run_study

    status = run_study(cfg)
    return _grid_done(status, write_report(cfg.out_dir, command=f"rspo study {' '.join(args.args)}"))


def _drift(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.lab.drift import run_drift, write_drift_report

    status = run_drift(cfg)
    return _grid_done(status, write_drift_report(cfg.out_dir, command=f"rspo drift {' '.join(args.args)}"))


def _gradvar(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.lab.gradvar import measure, write_gradvar

    print(f"wrote {write_gradvar(cfg, measure(cfg))}")
    return 0


def _verl_data(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.integrations.verl_reward import write_verl_data

    for name, path in write_verl_data(cfg, overwrite=args.overwrite).items():
        print(f"{name}: {path}")
    return 0


def _objectives(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.lab.toy import objectives_listing, objectives_table

    print(objectives_listing() if args.list else objectives_table(args.seed))
    return 0


def _models(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.lab.presets import presets_table

    print(presets_table(args.vocab_size))
    return 0


def _tasks(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.config import describe
    from rspo.tasks import list_tasks, task_class

    for name in list_tasks():
        cls = task_class(name)
        print(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        print(f"  reasons: {', '.join(cls.reasons)}")
        print("\n".join("  " + line for line in describe(cls.Options, "task.options.")) + "\n")
    return 0


def _plot(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.lab.plots import plot_runs

    out = args.out or str(Path(args.runs[0]) / "curves.png")
    print(f"wrote {plot_runs(args.runs, out)}")
    return 0


def _report(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.lab.report import write_report

    print(f"wrote {write_report(args.study_dir, command=args.command_line, out=args.out, overwrite=args.overwrite)}")
    return 0


def _drawdown_report(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.lab.drawdown import write_drawdown_report

    out = write_drawdown_report(args.study_dir, out=args.out, command=args.command_line, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _drift_report(args: argparse.Namespace, cfg: Any) -> int:
    from rspo.lab.drift import write_drift_report

    out = write_drift_report(args.atlas_dir, out=args.out, overwrite=args.overwrite, command=args.command_line)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------
def _out(what: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    return ("--out",), {"default": None, "help": f"directory for {what}"}


_COMMAND_LINE = (("--command-line",), {"default": None, "help": "the command to record in the report"})

COMMANDS: tuple[Command, ...] = (
    Command(
        "train",
        "GRPO-family RL of an MoE policy",
        _train,
        "rspo.train_config:TrainConfig",
        (
            (
                ("--resume",),
                {
                    "metavar": "RUN_DIR",
                    "help": "continue RUN_DIR from its last checkpoint (the "
                    "arguments are then overrides of its config)",
                },
            ),
            OVERWRITE,
        ),
    ),
    Command(
        "eval",
        "greedy pass@1, sampled avg@n and pass@k of a policy on one or several benchmarks",
        _eval,
        "rspo.evaluate:EvalConfig",
        (OVERWRITE,),
    ),
    Command(
        "pretrain",
        "pretrain a tiny MoE base policy from scratch on a task's references",
        _pretrain,
        "rspo.lab.pretrain:PretrainConfig",
        (OVERWRITE,),
    ),
    Command(
        "demo",
        "GRPO and RSPO side by side from the shipped base policy: before/after, drift",
        _demo,
        "rspo.lab.demo:DemoConfig",
        (OVERWRITE,),
    ),
    Command(
        "study", "a resumable grid of train runs (arm x seed), then its report", _study, "rspo.lab.study:StudyConfig"
    ),
    Command(
        "drift",
        "the drift atlas: pretrain models at one budget, RL regimes, then the report",
        _drift,
        "rspo.lab.drift:DriftConfig",
    ),
    Command(
        "gradvar",
        "policy-gradient variance over resampled mini-batches at fixed parameters",
        _gradvar,
        "rspo.lab.gradvar:GradVarConfig",
    ),
    Command(
        "verl-data",
        "a task's splits as verl parquet files (rspo's graders score them in verl)",
        _verl_data,
        "rspo.integrations.verl_reward:VerlDataConfig",
        (OVERWRITE,),
    ),
    Command(
        "objectives",
        "compute every objective on a toy batch and print a table",
        _objectives,
        None,
        (
            (("--list",), {"action": "store_true", "help": "list the objectives, defaults and papers"}),
            (("--seed",), {"type": int, "default": 0, "help": "seed of the toy batch"}),
        ),
    ),
    Command(
        "models",
        "list the model presets with total and active parameter counts",
        _models,
        None,
        ((("--vocab-size",), {"type": int, "default": 32, "help": "vocabulary size to count parameters with"}),),
    ),
    Command("tasks", "the registered tasks, their reasons and options", _tasks),
    Command(
        "plot",
        "PNG curves of one or several runs on one figure",
        _plot,
        None,
        (
            (("runs",), {"nargs": "+", "help": "run directories"}),
            (("--out",), {"default": None, "help": "PNG path (default: FIRST_RUN/curves.png)"}),
        ),
    ),
    Command(
        "report",
        "report.md and PNG figures of a study directory",
        _report,
        None,
        (
            (("study_dir",), {}),
            _out("report.md and figures (default: STUDY_DIR)"),
            _COMMAND_LINE,
            (("--overwrite",), {"action": "store_true", "help": "replace an earlier report in --out"}),
        ),
    ),
    Command(
        "drawdown-report",
        "the pre-registered heavy-drift analysis of a study (docs/study/heavy-drift/DESIGN.md)",
        _drawdown_report,
        None,
        (
            (("study_dir",), {}),
            _out("report.md and results.json (default: STUDY_DIR/drawdown)"),
            _COMMAND_LINE,
            (("--overwrite",), {"action": "store_true", "help": "replace an earlier analysis in --out"}),
        ),
    ),
    Command(
        "drift-report",
        "report.md, results.json and figures of a drift atlas",
        _drift_report,
        None,
        (
            (("atlas_dir",), {}),
            _out("the report (default: ATLAS_DIR)"),
            _COMMAND_LINE,
            (("--overwrite",), {"action": "store_true", "help": "replace an earlier report in --out"}),
        ),
    ),
)


def _help_lists_fields(parser: argparse.ArgumentParser, command: Command) -> None:
    """``--help`` ends with every config field (type, default, doc); built only when asked for."""
    base = parser.format_help

    def format_help() -> str:
        from rspo.config import describe

        fields = "\n".join(describe(command.config_class()))
        return f"{base()}\nconfig fields (YAML keys; dotted as field.sub=value on the command line):\n{fields}\n"

    parser.format_help = format_help  # type: ignore[method-assign]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rspo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for c in COMMANDS:
        sp = sub.add_parser(c.name, help=c.help, description=c.help)
        if c.config is not None:
            what = "a YAML config (optional), then dotted overrides, e.g. seed=3 optim.lr=1e-4"
            sp.add_argument("args", nargs="*", metavar="[CONFIG.yaml] field=value", help=what)
            _help_lists_fields(sp, c)
        for names, kwargs in c.flags:
            sp.add_argument(*names, **kwargs)
        sp.set_defaults(command_obj=c)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; an expected error (bad config, directory, checkpoint or model) is one line on
    stderr and exit code 2, argparse's own usage errors too. A traceback means a bug."""
    from rspo.errors import RspoError, brief

    args = build_parser().parse_args(argv)
    command: Command = args.command_obj
    try:
        resuming = getattr(args, "resume", None)
        cfg = command.load(args) if command.config is not None and not resuming else None
        return command.run(args, cfg)
    except (RspoError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        msg = " ".join(str(e).split())
        print(f"rspo {args.command}: error: {msg if len(msg) <= 2000 else brief(msg)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
