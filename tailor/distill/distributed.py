"""One distillation process: under ``torchrun`` one rank of a data-parallel run.

    torchrun --nproc-per-node N -m tailor.distill.distributed --teacher DIR --student DIR --out DIR [--profile P]

It owns the process group: it joins it (gloo on CPU, nccl with one GPU per rank), trains
through ``distill_checkpoint`` (every rank trains, rank 0 writes, the others wait at a
barrier) and leaves it, also when training fails. Without torchrun it is one ordinary
process. ``tailor distill`` and ``distill_data_parallel``'s processes both run this code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from tailor.common.console import setup_console
from tailor.common.layout import WorkDir
from tailor.config.settings import ConfigError, TailorConfig, TailorError, load_config
from tailor.data.tokenised import tokenise_corpus, tokens_in
from tailor.distill.generated import teacher_text_for
from tailor.distill.record import TrainingRecord
from tailor.distill.trainer import check_distill_out, distill_checkpoint
from tailor.store.checkpoint import CheckpointRef, check_checkpoint_target, existing_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of one distillation (the settings' own --profile and --set come from the caller)."""
    parser.add_argument("--teacher", required=True, help="teacher checkpoint folder")
    parser.add_argument("--student", required=True, help="student checkpoint folder")
    parser.add_argument("--out", required=True, help="folder for the distilled checkpoint")
    parser.add_argument(
        "--topk-cache", default=None, help="train from this teacher top-k cache file (distill.teacher_topk)"
    )
    parser.add_argument(
        "--tokens",
        default=None,
        help="a tokenised corpus folder (default: tokenise the profile's corpus into its work_dir)",
    )
    parser.add_argument(
        "--probe-dir",
        default=None,
        help="folder of this machine's bfloat16-or-float32 probe, which decides auto precisions "
        "(default: the profile's work_dir/probes)",
    )


@contextlib.contextmanager
def process_group() -> Iterator[str]:
    """torchrun's process group for the block (none for a single process); yields this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield "cpu"
        return
    import torch.distributed as dist

    device = "cpu"
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            # One GPU per process: without this, set_device fails with a CUDA traceback.
            raise TailorError(
                f"process {local_rank} of this node has no GPU of its own ({torch.cuda.device_count()} "
                "GPUs): run at most that many processes per node (torchrun --nproc-per-node, "
                "distill.nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield device
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def distill_folders(
    teacher: str | Path,
    student: str | Path,
    out: str | Path,
    cfg: TailorConfig,
    *,
    tokens: str | Path | None = None,
    topk_cache: str | Path | None = None,
    probe_dir: str | Path | None = None,
) -> tuple[CheckpointRef, TrainingRecord]:
    """Distil the ``student`` checkpoint folder from the ``teacher`` one into ``out``.

    ``tokens`` is a tokenised corpus folder (the launcher hands over the one the flow made);
    without it the profile's corpus is tokenised into (or found in) ``cfg.work_dir``.
    """
    refs = {}
    for role, folder in (("teacher", teacher), ("student", student)):
        refs[role] = existing_checkpoint(Path(folder))
        if refs[role] is None:
            raise TailorError(f"--{role} {folder} is not a llm-tailor checkpoint folder (no FINGERPRINT)")
    out = Path(out).resolve()
    # Before any work and before joining the group: a failure here must leave no group open.
    check_distill_out(out, refs["teacher"], refs["student"])
    if existing_checkpoint(out) is None:
        check_checkpoint_target(out)  # never train towards a folder we may not write
    sets = (
        tokens_in(tokens)
        if tokens
        else tokenise_corpus(
            refs["teacher"], cfg.distill, cfg.prune, cfg.data, cfg.work_dir, teacher_text_for(cfg, refs["teacher"])
        )
    )
    with process_group() as device:
        return distill_checkpoint(
            refs["teacher"],
            refs["student"],
            cfg.distill,
            sets["train"],
            out,
            heldout=sets["heldout"],
            device=device,
            topk_cache=Path(topk_cache) if topk_cache else None,
            probe_dir=Path(probe_dir) if probe_dir else WorkDir(cfg.work_dir).probes,
        )


def run(args: argparse.Namespace) -> int:
    """One distillation from parsed arguments (``add_arguments`` plus --profile and --set).

    Rank 0 prints one JSON line: the checkpoint and the run's main figures.
    """
    cfg = load_config(args.profile, args.set)
    if cfg.distill.then:
        raise ConfigError(
            f"distill.then holds {len(cfg.distill.then)} later phase(s); tailor distill runs one phase: run it once "
            "per phase (the next one's --student is this one's --out, with that phase's --set), or set "
            "distill.then=[] here and keep the phases for tailor run"
        )
    ref, record = distill_folders(
        args.teacher,
        args.student,
        args.out,
        cfg,
        tokens=args.tokens,
        topk_cache=args.topk_cache,
        probe_dir=args.probe_dir,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {
                    "path": ref.path,
                    "fingerprint": ref.fingerprint,
                    "optimizer_steps": record.optimizer_steps,
                    "train_tokens": record.train_tokens,
                    "world_size": record.world_size,
                    "losses": record.losses,
                    "grad_norms": record.grad_norms,
                }
            )
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tailor.distill.distributed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--profile", default="quick", help="profile name or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own logs and warnings")
    args = parser.parse_args(argv)
    setup_console(verbose=args.verbose)
    try:
        return run(args)
    except TailorError as exc:
        print(f"tailor: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
