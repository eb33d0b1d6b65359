"""The ``rspo`` command line."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from rspo import objectives, routing


def toy_batch(seed: int = 0, batch: int = 4, length: int = 6, layers: int = 4, experts: int = 8, top_k: int = 2):
    """A small reproducible off-policy batch: log-probs, advantages, mask and a real router shift.

    The router shift comes from two softmax routers (old, and old + noise) over ``experts``
    experts: gamma is computed from the old top-``top_k`` experts exactly as in training.
    """
    g = torch.Generator().manual_seed(seed)
    old_lp = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 3
    lp = old_lp + 0.3 * torch.randn(batch, length, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)[:batch]
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float64)
    old_logits = torch.randn(batch, length, layers, experts, generator=g, dtype=torch.float64)
    new_logits = old_logits + 0.5 * torch.randn(old_logits.shape, generator=g, dtype=torch.float64)
    old_lsm, new_lsm = old_logits.log_softmax(-1), new_logits.log_softmax(-1)
    idx = old_lsm.topk(top_k, dim=-1).indices
    gamma = routing.router_shift_ratio(old_lsm.gather(-1, idx), new_lsm.gather(-1, idx), gamma_min=0.5)
    nsr = routing.non_shifted_ratio(idx, new_lsm.topk(top_k, dim=-1).indices, mask)
    return lp, old_lp, adv, mask, gamma, nsr


def cmd_objectives(args: argparse.Namespace) -> int:
    if args.list:
        for name in objectives.list_objectives():
            o = objectives.get_objective(name)
            print(f"{name:11s} router_shift={o.router_shift:8s} defaults={dict(o.defaults)}")
            print(f"{'':11s} {o.summary}\n{'':11s} paper: {o.paper}")
        return 0
    lp, old_lp, adv, mask, gamma, nsr = toy_batch(args.seed)
    print(
        f"toy batch: B={lp.shape[0]} T={lp.shape[1]}, {int(mask.sum())} response tokens, "
        f"advantages {adv.tolist()}, gamma mean {gamma[mask > 0].mean():.3f}, non-shifted ratio {nsr:.2f}\n"
    )
    cols = [
        "loss/policy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "ratio/std",
        "kl/approx",
        "router/gamma_mean",
    ]
    print(f"{'objective':13s} {'router shift':13s} " + " ".join(f"{c:>20s}" for c in cols))
    for name in objectives.list_objectives():
        use = objectives.get_objective(name).router_shift
        variants: list[tuple[str, dict]] = [] if use == "required" else [("-", {})]
        if use != "none":
            variants += [(p, {"router_shift_placement": p}) for p in ("after_clip", "before_clip")]
        for label, hp in variants:
            rs = gamma if hp else None
            _, m = objectives.compute_policy_loss(name, lp, old_lp, adv, mask, router_shift=rs, **hp)
            cells = " ".join(f"{m[c]:>20.6f}" if c in m else f"{'':>20s}" for c in cols)
            print(f"{name:13s} {label:13s} {cells}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rspo.models import PRESETS, build_model, count_parameters
    from rspo.routing import MoERouters

    print(
        f"{'preset':26s} {'family':12s} {'total':>10s} {'active':>10s} {'MoE layers':>10s} {'E':>3s} {'k':>2s}  "
        f"{'trace B/token':>13s}  description"
    )
    for name, p in PRESETS.items():
        model = build_model(name, args.vocab_size)
        total, active = count_parameters(model)
        r = MoERouters(model)
        print(
            f"{name:26s} {p.family:12s} {total:>10,d} {active:>10,d} {r.num_layers:>10d} {r.num_experts:>3d} "
            f"{r.top_k:>2d}  {r.bytes_per_token():>13d}  {p.description}"
        )
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from rspo.config import load_config
    from rspo.pretrain import PretrainConfig, pretrain

    path, overrides = _config_and_overrides(args.args)
    cfg = load_config(PretrainConfig, path, overrides)
    result = pretrain(cfg, overwrite=args.overwrite)
    print(
        f"saved {cfg.out_dir}: {result['params_total']:,} parameters ({result['params_active']:,} active), "
        f"{result['train_seconds']:.0f} s, final loss {result['final_loss']:.3f}"
    )
    if "test_greedy_acc" in result:
        print(f"test accuracy: greedy {result['test_greedy_acc']:.1%}, sampled (T=1) {result['test_sampled_acc']:.1%}")
    return 0


def _config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """A leading YAML path (optional) followed by dotted key=value overrides."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_eval(args: argparse.Namespace) -> int:
    from rspo.config import _parse_scalar
    from rspo.errors import ConfigError
    from rspo.evaluate import evaluate, results_table, write_jsonl
    from rspo.policy import load_policy, resolve_model_path
    from rspo.rundir import RunDir
    from rspo.scoring import Scorer
    from rspo.tasks import make_task

    model = args.model_pos or args.model
    if not model or (args.model_pos and args.model and args.model_pos != args.model):
        raise ConfigError("give the model once: rspo eval MODEL (or --model MODEL)")
    options: dict = {}
    for item in args.task_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--task-option {item!r} must look like key=value")
        options[key] = _parse_scalar(value)
    if args.data:
        options["eval"] = dict(_name_path(d) for d in args.data)
    task = make_task(args.task, options)
    splits = args.split or (list(options["eval"]) if args.data else task.eval_splits()[-1:])
    for split in splits:
        task.eval_examples(split)  # an unknown split fails before the model is loaded
    model_path = resolve_model_path(model)
    out_dir = args.out_dir or f"runs/eval/{Path(model_path).name}-{task.name}"
    RunDir.check_new(out_dir, "eval", overwrite=args.overwrite)
    torch.set_num_threads(args.threads)
    policy = load_policy(model_path, device=args.device, dtype=args.dtype)
    run = RunDir.create(out_dir, "eval", overwrite=args.overwrite)
    scorer = Scorer(task, timeout_s=args.reward_timeout)
    results: dict = {}
    for split in splits:
        examples = task.eval_examples(split)[: args.limit]
        common = {"max_new_tokens": args.max_new_tokens, "seed": args.seed, "batch_size": args.batch_size,
                  "scorer": scorer, "progress": True}  # fmt: skip
        print(f"{split}: {len(examples)} examples")
        res = {"greedy": evaluate(policy, task, examples, greedy=True, **common)}
        if args.n:
            res["sampled"] = evaluate(policy, task, examples, greedy=False, n=args.n, temperature=args.temperature,
                                      top_p=args.top_p, **common)  # fmt: skip
        for r in res.values():
            print("  " + r.summary())
        write_jsonl(run.claim(f"responses-{split}.jsonl"),
                    [{**rec, "mode": r.mode} for r in res.values() for rec in r.records])  # fmt: skip
        results[split] = res
    scorer.close()
    table, data = results_table(results)
    settings = (f"model {model_path}, task {task.name}, greedy and {args.n} sampled response(s) per example "
                f"at T={args.temperature:g}, top-p {args.top_p:g}, seed {args.seed}")  # fmt: skip
    run.write_text("results.md", f"# Evaluation\n\n{settings}\n\n{table}\n")
    run.write_json("results.json", {"settings": settings, "results": data})
    print(f"\n{table}\n\nresults and responses: {run.path}")
    return 0


def _name_path(item: str) -> tuple[str, str]:
    from rspo.errors import ConfigError

    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--data {item!r} must look like NAME=PATH (e.g. aime24=data/aime24.parquet)")
    return name, path


def cmd_tasks(args: argparse.Namespace) -> int:
    from rspo.config import describe
    from rspo.tasks import list_tasks, task_class

    for name in list_tasks():
        cls = task_class(name)
        print(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        print(f"  reasons: {', '.join(cls.reasons)}")
        print("\n".join("  " + line for line in describe(cls.Options, "task.options.")) + "\n")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rspo.config import ConfigError, load_config
    from rspo.plots import plot_runs
    from rspo.rundir import RunDir
    from rspo.train_config import TrainConfig
    from rspo.trainer import TrainingError, resume, train

    try:
        if args.resume:
            if args.overwrite:
                raise ConfigError("--resume continues a run and --overwrite replaces one: choose one")
            summary = resume(args.resume, overrides=args.args)
        else:
            path, overrides = _config_and_overrides(args.args)
            summary = train(load_config(TrainConfig, path, overrides), overwrite=args.overwrite)
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


def cmd_plot(args: argparse.Namespace) -> int:
    from rspo.plots import plot_runs

    out = args.out or str(Path(args.runs[0]) / "curves.png")
    print(f"wrote {plot_runs(args.runs, out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rspo.demo import run_demo

    return run_demo(args.out_dir, args.config, args.args, overwrite=args.overwrite)


def cmd_study(args: argparse.Namespace) -> int:
    from rspo.config import load_config
    from rspo.study import StudyConfig, run_study, write_report

    path, overrides = _config_and_overrides(args.args)
    cfg = load_config(StudyConfig, path, overrides)
    status = run_study(cfg)
    failed = {k: v for k, v in status.items() if v.startswith("failed")}
    report = write_report(cfg.out_dir, command=f"rspo study {' '.join(args.args)}")
    print(f"{len(status) - len(failed)} runs done, {len(failed)} failed; report: {report}")
    return 1 if failed else 0


def cmd_drift(args: argparse.Namespace) -> int:
    from rspo.config import load_config
    from rspo.drift import DriftConfig, run_drift, write_drift_report

    path, overrides = _config_and_overrides(args.args)
    cfg = load_config(DriftConfig, path, overrides)
    status = run_drift(cfg)
    failed = {k: v for k, v in status.items() if v.startswith("failed")}
    report = write_drift_report(cfg.out_dir, command=f"rspo drift {' '.join(args.args)}")
    print(f"{len(status) - len(failed)} runs done, {len(failed)} failed; report: {report}")
    return 1 if failed else 0


def cmd_drift_report(args: argparse.Namespace) -> int:
    from rspo.drift import write_drift_report

    out = write_drift_report(args.atlas_dir, out=args.out, overwrite=args.overwrite, command=args.command_line)
    print(f"wrote {out}")
    return 0


def cmd_gradvar(args: argparse.Namespace) -> int:
    from rspo.config import load_config
    from rspo.variance import GradVarConfig, measure, write_gradvar

    path, overrides = _config_and_overrides(args.args)
    cfg = load_config(GradVarConfig, path, overrides)
    print(f"wrote {write_gradvar(cfg, measure(cfg))}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rspo.study import write_report

    print(f"wrote {write_report(args.study_dir, command=args.command_line, out=args.out, overwrite=args.overwrite)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rspo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    po = sub.add_parser("objectives", help="compute every objective on a toy batch and print a table")
    po.add_argument("--list", action="store_true", help="list registered objectives, defaults and papers")
    po.add_argument("--seed", type=int, default=0)
    po.set_defaults(func=cmd_objectives)
    pm = sub.add_parser("models", help="list the model presets with total and active parameter counts")
    pm.add_argument("--vocab-size", type=int, default=32, help="vocabulary size to count parameters with")
    pm.set_defaults(func=cmd_models)
    pp = sub.add_parser("pretrain", help="pretrain a tiny MoE base policy from scratch on a task's references")
    _help_lists_fields(pp, "PretrainConfig")
    pp.add_argument("args", nargs="*", help="[CONFIG.yaml] then field=value overrides, e.g. steps=1200 out_dir=DIR")
    pp.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    pp.set_defaults(func=cmd_pretrain)
    pe = sub.add_parser(
        "eval",
        help="greedy pass@1, sampled avg@n and pass@k of a policy on one or several benchmarks",
        description="rspo eval MODEL --task math --data aime24=PATH --data math500=PATH --n 32 --temperature 0.6",
    )
    pe.add_argument("model_pos", nargs="?", metavar="MODEL", help="checkpoint directory, hub id, or 'base'")
    pe.add_argument("--model", default=None, help="the same as MODEL")
    pe.add_argument("--task", default="countdown", help="task name or pkg.module:TaskClass (see rspo tasks)")
    pe.add_argument("--split", action="append", default=[], help="an evaluation split of the task (repeatable); "
                    "default: the --data benchmarks, else the task's last split (countdown: test)")  # fmt: skip
    pe.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                    help="a benchmark file (JSONL/Parquet) for the math task (repeatable)")  # fmt: skip
    pe.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a task option, e.g. prompt_format=text (repeatable)")  # fmt: skip
    pe.add_argument("--n", type=_int_at_least(0), default=1, help="sampled responses per example (0: greedy only)")
    pe.add_argument("--temperature", type=_positive_float, default=1.0, help="sampling temperature of the sampled pass")
    pe.add_argument("--top-p", type=_unit_float, default=1.0, help="nucleus sampling threshold, in (0, 1]")
    pe.add_argument("--max-new-tokens", type=_int_at_least(1), default=None, help="default: the task's")
    pe.add_argument("--limit", type=_int_at_least(1), default=None, help="evaluate only the first N examples")
    pe.add_argument("--batch-size", type=_int_at_least(1), default=128, help="responses generated at once")
    pe.add_argument("--seed", type=int, default=0)
    pe.add_argument("--threads", type=_int_at_least(1), default=2)
    pe.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pe.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    pe.add_argument("--reward-timeout", type=_positive_float, default=10.0, help="seconds per reward call")
    pe.add_argument("--out-dir", default=None, help="results.md, results.json, responses (default: runs/eval/...)")
    pe.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out-dir")
    pe.set_defaults(func=cmd_eval)
    ptk = sub.add_parser("tasks", help="the registered tasks, their reasons and options")
    ptk.set_defaults(func=cmd_tasks)
    pt = sub.add_parser("train", help="GRPO-family RL of an MoE policy (YAML preset plus field=value overrides)")
    _help_lists_fields(pt, "TrainConfig")
    pt.add_argument("args", nargs="*", help="CONFIG.yaml then overrides, e.g. objective.name=gspo seed=3")
    pt.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint")
    pt.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    pt.set_defaults(func=cmd_train)
    pl = sub.add_parser("plot", help="PNG curves of one or several runs on one figure")
    pl.add_argument("runs", nargs="+", help="run directories")
    pl.add_argument("--out", default=None, help="PNG path (default: FIRST_RUN/curves.png)")
    pl.set_defaults(func=cmd_plot)
    ps = sub.add_parser("study", help="a resumable grid of train runs (arm x seed), then its report")
    ps.add_argument("args", nargs="+", help="STUDY.yaml then overrides, e.g. parallel=2 seeds=[0,1]")
    ps.set_defaults(func=cmd_study)
    pdr = sub.add_parser("drift", help="the drift atlas: pretrain models at one budget, RL regimes, then the report")
    pdr.add_argument("args", nargs="+", help="DRIFT.yaml then overrides, e.g. parallel=2")
    pdr.set_defaults(func=cmd_drift)
    pdrr = sub.add_parser("drift-report", help="report.md, results.json and figures of a drift atlas")
    pdrr.add_argument("atlas_dir")
    pdrr.add_argument("--command-line", default=None, help="the drift command to record in the report")
    pdrr.add_argument("--out", default=None, help="directory for the report (default: ATLAS_DIR)")
    pdrr.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    pdrr.set_defaults(func=cmd_drift_report)
    pg = sub.add_parser("gradvar", help="policy-gradient variance over resampled mini-batches at fixed parameters")
    pg.add_argument("args", nargs="*", help="[GRADVAR.yaml] then overrides, e.g. 'overrides=[model=DIR]' draws=32")
    pg.set_defaults(func=cmd_gradvar)
    pr = sub.add_parser("report", help="report.md and PNG figures of a study directory")
    pr.add_argument("study_dir")
    pr.add_argument("--command-line", default=None, help="the study command to record in the report")
    pr.add_argument("--out", default=None, help="directory for report.md and figures (default: STUDY_DIR)")
    pr.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    pr.set_defaults(func=cmd_report)
    pd = sub.add_parser("demo", help="GRPO and RSPO side by side from the shipped base policy: before/after, drift")
    pd.add_argument("--out-dir", default="runs/demo")
    pd.add_argument("--config", default=None, help="train config (default: configs/demo.yaml)")
    pd.add_argument("args", nargs="*", help="overrides for the train config")
    pd.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    pd.set_defaults(func=cmd_demo)
    return p


OVERWRITE_HELP = (
    "replace this command's own earlier output in the directory (only the files it wrote; a directory "
    "it did not create is never written to)"
)


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v

    return parse


def _help_lists_fields(parser: argparse.ArgumentParser, name: str) -> None:
    """``--help`` ends with every config field (type, default, doc); built only when asked for, since the
    config modules import transformers."""
    base = parser.format_help

    def format_help() -> str:
        from rspo.config import describe

        if name == "TrainConfig":
            from rspo.train_config import TrainConfig as cls
        else:
            from rspo.pretrain import PretrainConfig as cls
        fields = "\n".join(describe(cls))
        return f"{base()}\nconfig fields (YAML keys; dotted as field.sub=value on the command line):\n{fields}\n"

    parser.format_help = format_help  # type: ignore[method-assign]


def _unit_float(text: str) -> float:
    v = _positive_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; an expected error (bad config, directory, checkpoint or model) is one line on
    stderr and exit code 2, argparse's own usage errors too. A traceback means a bug."""
    from rspo.errors import RspoError, brief

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RspoError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        msg = " ".join(str(e).split())
        print(f"rspo {args.command}: error: {msg if len(msg) <= 2000 else brief(msg)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
