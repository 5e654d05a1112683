"""The CLI's PIR commands (seed 000): impressions tables in and out as CSV, estimator and tuning jobs.

gansteer impressions report TABLE rows.csv      # columns: generator, seed, class_id, impressions, interactions, ...
gansteer impressions export TABLE [--out t.csv]
gansteer pir-estimator TABLE [--simulate-generator G --objective '{"output": "colour_single", ...}']
gansteer pir-tune GENERATOR --estimator E [--objective ...] [--no-guards]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from typing import Any, cast

from gansteer.kinds.pir import PIREstimatorOptions, PIRTuningOptions

Command = Callable[[str, str, Callable[[argparse.Namespace], int]], argparse.ArgumentParser]
_COLUMNS = ("generator", "seed", "class_id", "image_id", "impressions", "interactions", "cohort")
_INTS = ("seed", "class_id", "impressions", "interactions")


def _cli() -> Any:
    from gansteer import cli  # the shared helpers (client, waiting, output); imported late: cli imports this module

    return cli


def cmd_report(args: argparse.Namespace) -> int:
    cli = _cli()
    with open(args.csv, newline="") as handle:
        rows = [
            {key: int(value) if key in _INTS else value for key, value in row.items() if value not in ("", None)}
            for row in csv.DictReader(handle)
        ]
    with cli._client(args) as client:
        recorded, total, duplicate = client.report_impressions(args.dataset, rows, idempotency_key=args.key)
    document = {"dataset": args.dataset, "recorded": recorded, "total": total, "duplicate": duplicate}
    cli._emit(args, document, lambda: f"{args.dataset}: {recorded} recorded, {total} in the table")
    return int(cli.EXIT_OK)


def cmd_export(args: argparse.Namespace) -> int:
    cli = _cli()
    with cli._client(args) as client:
        rows = client.impressions(args.dataset)
    columns = [*_COLUMNS, "time", "reporter", "received_at", "source"]
    handle = open(args.out, "w", newline="") if args.out else sys.stdout  # noqa: SIM115
    try:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if args.out:
            handle.close()
    return int(cli.EXIT_OK)


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) not in (None, False)}


def _finish(args: argparse.Namespace, job: Any) -> int:
    cli = _cli()
    if cli._announced(args, job):
        return int(cli.EXIT_OK)
    cli._wait(args, job, cancel_on_interrupt=True)
    result = job.result(wait=False)
    document = {"job_id": job.id, "models": result.models, "metrics": dict(result.metrics)}
    lines = [f"job {job.id} succeeded", *(f"registered: {m}" for m in result.models)]
    lines += [f"{key}: {value:.6g}" for key, value in sorted(result.metrics.items())]
    cli._emit(args, document, lambda: "\n".join(lines))
    return int(cli.EXIT_OK)


_ESTIMATOR = ("backbone", "bins", "learning_rate", "epochs", "held_out", "temperature", "single", "init_estimator",
              "register_as", "seed", "simulate_generator", "simulate_images", "simulate_impressions",
              "simulate_seed")  # fmt: skip
_TUNING = ("discriminator", "check_estimator", "real_data", "pir_weight", "learning_rate", "steps", "batch_size",
           "anchor_weight", "check_every", "patience", "no_guards", "temperature", "register_as", "seed",
           "eval_images")  # fmt: skip


def cmd_estimator(args: argparse.Namespace) -> int:
    options = _given(args, _ESTIMATOR)
    if args.objective:
        options["simulate_objective"] = json.loads(args.objective)
    with _cli()._client(args) as client:
        job = client.pir_estimator(dataset=args.dataset, **cast(PIREstimatorOptions, options))
        return _finish(args, job)


def cmd_tune(args: argparse.Namespace) -> int:
    options = _given(args, _TUNING)
    if args.objective:
        options["objective"] = json.loads(args.objective)
    with _cli()._client(args) as client:
        job = client.pir_tuning(model=args.generator, estimator=args.estimator, **cast(PIRTuningOptions, options))
        return _finish(args, job)


def add_commands(command: Command, common: Callable[..., None]) -> None:
    """Adds `impressions`, `pir-estimator` and `pir-tune` through the CLI's `command` helper."""
    impressions = command("impressions", "report and export impressions tables (PIR data, seed 000)", lambda _a: 2)
    verbs = impressions.add_subparsers(dest="impressions_command", required=True, metavar="IMPRESSIONS_COMMAND")
    report = verbs.add_parser("report", help="append the rows of a CSV file to a table")
    common(report, top=False)
    report.set_defaults(run=cmd_report)
    report.add_argument("dataset")
    report.add_argument("csv", help=f"a CSV file with columns {', '.join(_COLUMNS)} (latent: use the SDK)")
    report.add_argument("--key", help="idempotency key: a resend with the same key records nothing")
    export = verbs.add_parser("export", help="write a table as CSV, with provenance")
    common(export, top=False)
    export.set_defaults(run=cmd_export)
    export.add_argument("dataset")
    export.add_argument("--out", help="file to write (default: stdout)")

    estimator = command("pir-estimator", "train a PIR estimator and its check estimator on a table", cmd_estimator)
    estimator.add_argument("dataset")
    estimator.add_argument("--simulate-generator", help="collect simulated interactions on this generator first")
    estimator.add_argument("--objective", help='the simulated true rate, JSON: {"output": ..., "params": {...}}')
    estimator.add_argument("--simulate-images", type=int, help="images (1000)")
    estimator.add_argument("--simulate-impressions", type=int, help="impressions per image (1000)")
    estimator.add_argument("--simulate-seed", type=int)
    estimator.add_argument("--backbone", help="a classifier with features() (scenes-clf-alt)")
    estimator.add_argument("--bins", type=int, help="softmax bins (100)")
    estimator.add_argument("--learning-rate", type=float, help="Adam (5e-4)")
    estimator.add_argument("--epochs", type=int, help="(30)")
    estimator.add_argument("--held-out", type=float, help="share of images held out (0.1)")
    estimator.add_argument("--temperature", type=float, help="softmax temperature at use (0.01)")
    estimator.add_argument("--single", action="store_true", help="one estimator on the whole table, no check")
    estimator.add_argument("--init-estimator", help="continue from this estimator (round 2)")
    estimator.add_argument("--register-as", metavar="NAME", help="(pir-TABLE)")
    estimator.add_argument("--seed", type=int)
    estimator.add_argument("--no-wait", action="store_true", help="print the job id and return at once")

    tune = command("pir-tune", "tune a generator toward a PIR estimator, guarded (seed 000)", cmd_tune)
    tune.add_argument("generator")
    tune.add_argument("--estimator", required=True, help="the pir_estimator to optimise")
    tune.add_argument("--check-estimator", help="the guard's estimator (default: the estimator card's)")
    tune.add_argument("--discriminator", help="(default: the generator card's)")
    tune.add_argument("--real-data", help="'scenes' or an absolute folder on the workers")
    tune.add_argument("--pir-weight", type=float, help="w_PIR (10)")
    tune.add_argument("--learning-rate", type=float, help="(5e-5)")
    tune.add_argument("--steps", type=int, help="(100)")
    tune.add_argument("--batch-size", type=int, help="(16)")
    tune.add_argument("--anchor-weight", type=float, help="pixel anchor to the frozen generator (20)")
    tune.add_argument("--check-every", type=int, help="(25)")
    tune.add_argument("--patience", type=int, help="(2)")
    tune.add_argument("--no-guards", action="store_true", help="neither anchor nor early stopping")
    tune.add_argument("--temperature", type=float, help="(0.01)")
    tune.add_argument("--objective", help="judge by this true rate, JSON")
    tune.add_argument("--eval-images", type=int, help="(1000)")
    tune.add_argument("--register-as", metavar="NAME")
    tune.add_argument("--seed", type=int)
    tune.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
