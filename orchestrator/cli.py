"""The ``ccdni`` command: train, compare, report."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cerebellum_service.config import LEARNING, PRECISIONS
from cortex_service.runtime import SCHEDULES
from orchestrator.bench import add_bench_parser, run_bench_command
from orchestrator.config import (
    CONTEXT_ZONES,
    MODELS,
    UPDATES,
    ConfigError,
    Lesion,
    TrainConfig,
    for_task,
)

logger = logging.getLogger("ccdni")


def _truncation(text: str) -> int | str:
    if text == "full":
        return "full"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--truncation {text!r}: expected a number of steps or 'full'"
        ) from None
    return value


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that trains (train, compare, sweep)."""
    from orchestrator.tasks.registry import TASKS

    group = parser.add_argument_group("training")
    group.add_argument("--task", default="line", choices=TASKS)
    group.add_argument(
        "--truncation", type=_truncation, help="window length T, or 'full'"
    )
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int)
    group.add_argument(
        "--hidden", type=int, dest="hidden_size", help="LSTM units per layer"
    )
    group.add_argument("--layers-per-chunk", type=int)
    group.add_argument("--chunks", type=int, help="cut the cortex into K chunks")
    group.add_argument("--lr", type=float, help="cortical Adam learning rate")
    group.add_argument("--cerebellum-lr", type=float)
    group.add_argument("--granule-width", type=int, help="granule cells per microzone")
    group.add_argument("--granule-layers", type=int)
    group.add_argument(
        "--inputs-per-granule",
        type=int,
        help="sparse mossy fibres: inputs per granule cell",
    )
    group.add_argument(
        "--context",
        action="store_true",
        default=None,
        help="give microzones the target cue",
    )
    group.add_argument(
        "--time-context",
        action="store_true",
        default=None,
        help="give microzones the time step of what they predict for (one-hot)",
    )
    group.add_argument(
        "--context-zones",
        choices=CONTEXT_ZONES,
        help="which microzones --context and --time-context reach: all (default), "
        "the state zones of the temporal cut, or the output zones of the "
        "spatial cut (decoupled)",
    )
    group.add_argument(
        "--feedback-scale", type=float, help="scale of predicted feedback"
    )
    group.add_argument(
        "--output-feedback-scale",
        type=float,
        help="scale of the feedback predicted for a chunk's outputs under "
        "decoupled (default: --feedback-scale)",
    )
    group.add_argument("--clip", type=float, help="gradient-norm clip (0: none)")
    group.add_argument(
        "--update", choices=UPDATES, help="update once per sequence or once per window"
    )
    group.add_argument("--dropout", type=float)
    group.add_argument("--eval-every", type=int, help="evaluate every N epochs")
    group.add_argument("--data-dir", help="MNIST IDX files (or COCO captions) to read")
    group.add_argument(
        "--n-train", type=int, help="cap the number of training sequences"
    )
    group.add_argument("--threads", type=int, help="torch threads in this process")
    group.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )


def add_distributed_options(parser: argparse.ArgumentParser) -> None:
    """Options of a distributed run (chunks and cerebellum as Ray actors)."""
    group = parser.add_argument_group("distributed (Ray actors, gRPC between them)")
    group.add_argument(
        "--distributed", action="store_true", help="run each chunk as a Ray actor"
    )
    group.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="decoupled",
        help="how chunks wait for each other (default decoupled)",
    )
    group.add_argument("--micro-batches", type=int, default=1, help="M for pipelined")
    group.add_argument(
        "--forward-unlock",
        action="store_true",
        help="chunks above the first run on input predicted by the cerebellum",
    )
    group.add_argument(
        "--max-in-flight",
        type=int,
        default=2,
        help="windows between two chunks before the sender stalls (default 2)",
    )
    group.add_argument("--steps", type=int, help="batches to train (default: epochs)")
    group.add_argument(
        "--ray-address",
        help="join this Ray cluster ('auto' under ray job submit); "
        "default: start a local one",
    )
    group.add_argument(
        "--cpus-per-actor",
        type=float,
        default=0.5,
        help="CPU share reserved per actor without GPUs (default 0.5)",
    )
    group.add_argument(
        "--gpus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per actor (default: when the cluster has enough)",
    )
    group.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        help="steps between checkpoints (default 50; 0: only at the start)",
    )
    group.add_argument(
        "--resume", help="continue the distributed run in this directory"
    )
    group.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="do not serve Prometheus /metrics from the actors",
    )
    group.add_argument(
        "--cerebellum-learning",
        choices=LEARNING,
        default="background",
        help="when the cerebellum actor learns: as feedback arrives (background, "
        "default) or when the chunks' optimisers step, as in one process "
        "(on_update: slower, but a one-chunk run then equals the in-process "
        "trainer)",
    )
    group.add_argument(
        "--cerebellum-nice",
        type=int,
        default=10,
        help="lower the cerebellum actor's CPU priority by this much (0-19, "
        "default 10): where it shares cores with chunks they get them first",
    )
    group.add_argument(
        "--batch-scheduling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run every actor's threads as batch jobs (Linux SCHED_BATCH, "
        "default on), so that a thread woken by a message does not preempt "
        "one that computes",
    )
    group.add_argument(
        "--cerebellum-precision",
        choices=PRECISIONS,
        default="auto",
        help="dtype of the cerebellum's arithmetic and of the activity and "
        "feedback sent to it (default auto: bfloat16 where its device computes "
        "bfloat16 natively, else float32; weights stay float32)",
    )
    group.add_argument(
        "--prometheus-sd",
        metavar="FILE",
        help="write the Prometheus file_sd list of actor endpoints here "
        "(default OUT/prometheus-targets.json)",
    )


def distributed_from_args(args: argparse.Namespace):
    from orchestrator.cluster import DistributedConfig

    return DistributedConfig(
        schedule=args.schedule,
        micro_batches=args.micro_batches,
        forward_unlock=args.forward_unlock,
        max_in_flight=args.max_in_flight,
        steps=args.steps,
        ray_address=args.ray_address,
        cpus_per_actor=args.cpus_per_actor,
        gpus=args.gpus,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        metrics=args.metrics,
        prometheus_sd=args.prometheus_sd,
        cerebellum_learning=args.cerebellum_learning,
        cerebellum_nice=args.cerebellum_nice,
        batch_scheduling=args.batch_scheduling,
        cerebellum_precision=args.cerebellum_precision,
    )


def experiment_distributed(args: argparse.Namespace):
    """The DistributedConfig of ``compare``/``sweep --distributed``, else None."""
    if not args.distributed:
        return None
    if args.resume:
        raise ConfigError(
            "--resume continues one distributed run (ccdni train); a comparison "
            "or sweep continues by itself: rerun it without --resume"
        )
    return distributed_from_args(args)


def config_from_args(args: argparse.Namespace, **fixed: Any) -> TrainConfig:
    """Task defaults, then the flags given on the command line."""
    names = (
        "truncation epochs batch_size hidden_size layers_per_chunk chunks lr "
        "cerebellum_lr granule_width granule_layers inputs_per_granule context "
        "time_context context_zones feedback_scale output_feedback_scale clip "
        "update dropout eval_every data_dir n_train threads"
    ).split()
    values = {name: getattr(args, name, None) for name in names}
    lesions = getattr(args, "lesion", None)
    if lesions:
        values["lesions"] = tuple(Lesion.parse(text) for text in lesions)
    values.update(fixed)
    return for_task(args.task, **values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccdni",
        description="Cortico-cerebellar decoupled training of recurrent networks.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model on one task")
    add_training_options(train)
    train.add_argument("--model", choices=MODELS, default="ccrnn")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--lesion",
        action="append",
        metavar="KIND@EPOCH",
        help="cerebellum@E removes predictions from epoch E; olive@E stops cerebellar "
        "learning from epoch E (repeatable)",
    )
    train.add_argument("--out", required=True, help="run directory to write")
    add_distributed_options(train)

    compare = commands.add_parser("compare", help="ccRNN vs cRNN vs BPTT over seeds")
    add_training_options(compare)
    compare.add_argument("--models", default="ccrnn,crnn,bptt")
    compare.add_argument("--seeds", type=int, default=5)
    compare.add_argument("--out", required=True)
    compare.add_argument(
        "--plot-only", action="store_true", help="redraw from stored runs, no training"
    )
    add_distributed_options(compare)

    report = commands.add_parser("report", help="plots of a run or a comparison")
    report.add_argument("run_dir")

    from orchestrator.demo import add_demo_parser

    add_demo_parser(commands)

    from orchestrator.sweep import add_sweep_parser

    add_sweep_parser(commands)
    add_bench_parser(commands)
    return parser


def _train(args: argparse.Namespace) -> int:
    from orchestrator.tasks.registry import load_task
    from orchestrator.trainer import Trainer

    config = config_from_args(args, model=args.model, seed=args.seed)
    if args.resume and not args.distributed:
        raise ConfigError("--resume continues a distributed run: add --distributed")
    if args.distributed:
        from orchestrator.cluster import train_distributed

        dist = distributed_from_args(args)
        task = load_task(
            config.task,
            seed=config.seed,
            data_dir=config.data_dir,
            n_train=config.n_train,
        )
        summary = train_distributed(
            config, dist, task, args.out, progress=not args.no_progress
        )
        logger.info(
            "%s/%s on %d chunks: %.2f steps/s, validation loss %.4f, %s %.4f; wrote %s",
            config.task,
            dist.schedule,
            config.chunks,
            summary["steps_per_second"],
            summary["validation_loss"],
            summary["metric_name"],
            summary["validation_metric"],
            args.out,
        )
        return 0
    task = load_task(
        config.task, seed=config.seed, data_dir=config.data_dir, n_train=config.n_train
    )
    summary = Trainer(config, task).fit(args.out, progress=not args.no_progress)
    logger.info(
        "%s/%s: validation loss %.4f, %s %.4f in %.1f s; wrote %s",
        config.task,
        config.model,
        summary["validation_loss"],
        summary["metric_name"],
        summary["validation_metric"],
        summary["wall_seconds"],
        args.out,
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from orchestrator import compare

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ConfigError(
            f"--models {args.models!r}: unknown {unknown}; choose from {MODELS}"
        )
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    out = Path(args.out)
    if not args.plot_only:
        base = config_from_args(args)
        compare.run_comparison(
            base,
            models,
            args.seeds,
            out,
            progress=not args.no_progress,
            dist=experiment_distributed(args),
        )
    table = compare.write_comparison(out)
    sys.stdout.write(table + "\n")
    return 0


def _report(args: argparse.Namespace) -> int:
    from orchestrator import report

    written = report.report(Path(args.run_dir))
    for path in written:
        sys.stdout.write(f"{path}\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from orchestrator.demo import run_demo

    return run_demo(args)


def _sweep(args: argparse.Namespace) -> int:
    from orchestrator.sweep import run_sweep_command

    return run_sweep_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handlers = {
        "train": _train,
        "compare": _compare,
        "report": _report,
        "demo": _demo,
        "sweep": _sweep,
        "bench": run_bench_command,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as error:
        parser.exit(2, f"ccdni: error: {error}\n")
    except FileNotFoundError as error:
        parser.exit(2, f"ccdni: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
