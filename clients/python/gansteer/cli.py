"""`gansteer`: the command line over the SDK: start a local stack, list models, job kinds and optimizers, generate,
invert, evolve, search latents, learn class embeddings, manage jobs.

Scripts rely on two things: `--json` (one JSON document on stdout; `jobs watch --json` writes one per event) and the
exit codes, which say what went wrong without parsing messages:

    0 ok, 1 any other error, 2 usage, 3 invalid argument (the server's or the CLI's check), 4 not found,
    5 unavailable or deadline exceeded, 6 job failed or cancelled, 130 interrupted (Ctrl-C)

Connection options (`--target`, `--api-key` ...) default to the variables GANSTEER_TARGET,
GANSTEER_GENERATION_TARGET, GANSTEER_SCORING_TARGET and GANSTEER_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import numpy as np

from gansteer import cli_pir, errors
from gansteer._transport import DEFAULT_TARGET
from gansteer.client import Client
from gansteer.images import image_grid, save_inversion
from gansteer.job import Job
from gansteer.kinds.embedding_am import INITS, EmbeddingAMOptions, EmbeddingAMResult
from gansteer.kinds.evolution import EvolutionOptions
from gansteer.kinds.human_nes import HumanNESOptions
from gansteer.kinds.inversion import DEFAULT_BUDGET, InversionOptions
from gansteer.kinds.latent_search import DEFAULT_BUDGET as SEARCH_BUDGET
from gansteer.kinds.latent_search import LatentSearchOptions
from gansteer.saved import load_result
from gansteer.types import Answer, JobState, OptimizerInfo, Round, StateChanged

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INVALID, EXIT_NOT_FOUND, EXIT_UNAVAILABLE, EXIT_JOB_FAILED = 0, 1, 2, 3, 4, 5, 6
EXIT_INTERRUPTED = 130

_EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (errors.JobFailed, EXIT_JOB_FAILED),
    (errors.InvalidArgument, EXIT_INVALID),
    (errors.FailedPrecondition, EXIT_INVALID),
    (errors.NotFound, EXIT_NOT_FOUND),
    (errors.Unavailable, EXIT_UNAVAILABLE),
    (errors.DeadlineExceeded, EXIT_UNAVAILABLE),
    (FileNotFoundError, EXIT_INVALID),
]


def exit_code(error: BaseException) -> int:
    """The documented exit code for an error escaping a command."""
    for cls, code in _EXIT_CODES:
        if isinstance(error, cls):
            return code
    return EXIT_ERROR


# --- output -------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-ready copy of SDK values (dataclasses, enums, datetimes, arrays, paths); images are left out."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value) if f.name not in ("images", "card")}
    if isinstance(value, JobState):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _emit(args: argparse.Namespace, document: Any, text: Callable[[], str]) -> None:
    print(json.dumps(_plain(document), indent=2) if args.json else text())


# --- commands -----------------------------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.target,
        api_key=args.api_key or None,
        generation_target=args.generation_target or None,
        scoring_target=args.scoring_target or None,
        timeout=args.timeout,
    )


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.models(args.kind, name_contains=args.name, all_versions=args.all_versions)
    _emit(
        args,
        models,
        lambda: (
            "\n".join(f"{m.ref:28} {m.kind:18} {m.resolution:>4}px  {m.description}" for m in models) or "no models"
        ),
    )
    return EXIT_OK


def cmd_kinds(args: argparse.Namespace) -> int:
    with _client(args) as client:
        kinds = client.job_kinds()

    def table() -> str:
        lines = []
        for kind in kinds:
            lines.append(f"{kind.name:24} {'rounds' if kind.has_rounds else '':7} {kind.description}")
            lines += [f"    {o.name:24} {o.type:28} {o.default_json}".rstrip() for o in kind.options]
        return "\n".join(lines) or "no job kinds"

    _emit(args, kinds, table)
    return EXIT_OK


def cmd_optimizers(args: argparse.Namespace) -> int:
    with _client(args) as client:
        optimizers = client.optimizers()
    _emit(
        args,
        optimizers,
        lambda: (
            "\n".join(
                f"{o.name:20} {'gradient' if o.gradient else 'gradient-free':14} {_optimizer_default(o):18} "
                f"{o.description}"
                for o in optimizers
            )
            or "no optimizers"
        ),
    )
    return EXIT_OK


def _optimizer_default(optimizer: OptimizerInfo) -> str:
    if optimizer.gradient:
        return f"lr {optimizer.default_learning_rate:g}" if optimizer.default_learning_rate else ""
    return f"population {optimizer.default_population}" if optimizer.default_population else ""


def cmd_generate(args: argparse.Namespace) -> int:
    if args.from_result is not None:
        return _regenerate(args)
    if args.model is None:
        raise errors.InvalidArgument("give a generator, or --from a saved result")
    classes = [_class(c) for c in args.classes] if args.classes else None
    # New images on every run unless a seed is given, as image-generation tools do; the seed is printed, so that
    # `--seed` brings a run's images back.
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    with _client(args) as client:
        result = client.generate(args.model, args.n, seed=seed, classes=classes, truncation=args.truncation)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(result.images):
        paths.append(out / f"image_{i}.png")
        image.save(paths[-1])
    np.save(out / "latents.npy", result.latents)
    image_grid([result.images]).save(out / "grid.png")
    document = {
        "model": result.model,
        "seed": seed,
        "images": paths,
        "grid": out / "grid.png",
        "class_ids": result.class_ids,
        "latents": out / "latents.npy",
    }
    _emit(args, document, lambda: "\n".join([*(str(p) for p in [*paths, out / "grid.png"]), f"seed {seed}"]))
    return EXIT_OK


def _regenerate(args: argparse.Namespace) -> int:
    """`generate --from`: a saved result's images rendered again, each compared with the saved one."""
    flags = (("MODEL", args.model), ("--class", args.classes), ("--truncation", args.truncation))
    given = [flag for flag, value in flags if value is not None]
    if given:
        raise errors.InvalidArgument(f"--from takes everything from the saved result; drop {', '.join(given)}")
    saved = load_result(args.from_result)
    with _client(args) as client:
        result = client.regenerate(saved)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"image_{i}.png" for i in range(len(result.images))]
    for image, path in zip(result.images, paths, strict=True):
        image.save(path)
    identical = [
        np.array_equal(np.asarray(new), np.asarray(old))
        for new, old in zip(result.images, saved.load_images(), strict=True)
    ]
    document = {"model": result.model, "from": saved.path, "images": paths, "identical": identical}
    same = sum(identical)
    _emit(args, document, lambda: "\n".join([*map(str, paths), f"{same} of {len(paths)} identical to the saved"]))
    return EXIT_OK


def _announced(args: argparse.Namespace, job: Job) -> bool:
    """Says the job was submitted: its id alone with --no-wait (True: the command is done), else on stderr."""
    if args.no_wait:
        _emit(args, {"job_id": job.id, "state": "queued"}, lambda: job.id)
        return True
    if not args.json:
        print(f"submitted job {job.id}", file=sys.stderr)
    return False


def _wait(args: argparse.Namespace, job: Job, *, cancel_on_interrupt: bool) -> None:
    """Waits for the job; Ctrl-C cancels it when this command submitted it."""
    try:
        job.wait(progress=not args.json and not args.quiet)
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            job.cancel("interrupted from the command line")
            print(f"cancelled job {job.id}", file=sys.stderr)
        raise


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The options among `names` given on the command line (unset ones take the server's defaults)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _class(text: str) -> int | str:
    """A class as typed: an id (digits) or a name."""
    return int(text) if text.isdigit() else text


def _out(args: argparse.Namespace, job: Job) -> Path:
    """Where a finished job's files go: `--out`, else out/JOB_ID (a result is always saved somewhere)."""
    return Path(args.out) if args.out else Path("out") / job.id


def _wait_and_save(
    args: argparse.Namespace, job: Job, targets: Sequence[Any] | None, *, cancel_on_interrupt: bool = False
) -> int:
    """Waits for the job (Ctrl-C cancels it when this command submitted it), then prints and saves its result."""
    _wait(args, job, cancel_on_interrupt=cancel_on_interrupt)
    return _save(args, job, targets)


def _save(args: argparse.Namespace, job: Job, targets: Sequence[Any] | None, *, state: str = "succeeded") -> int:
    """Prints the result's metrics and, with --out, writes targets, results, result.json (what regenerates them),
    grid, latents and metrics."""
    result = job.result(wait=False)
    document: dict[str, Any] = {"job_id": job.id, "metrics": result.metrics, "items": result.item_metrics}
    if state != "succeeded":
        document["state"] = state
    lines = [f"job {job.id} {state}" + ("" if state == "succeeded" else ": its best result so far")]
    out = _out(args, job)
    saved = save_inversion(result, list(targets) if targets is not None else job.targets(), out)
    document.update(files=saved, result=result.save(out, spec=job.spec()).path)
    lines += [f"grid: {saved.grid}", *(f"result: {p}" for p in saved.results), f"saved: {document['result']}"]
    for i, item in enumerate(result.item_metrics):
        lines.append(f"target {i}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(item.items())))
    _emit(args, document, lambda: "\n".join(lines))
    return EXIT_OK


# `gansteer invert` options passed to `Client.invert` under the same name when given.
_INVERT_OPTIONS = (
    "criterion",
    "discriminator",
    "optimizer",
    "learning_rate",
    "budget",
    "budget_unit",
    "restarts",
    "seed",
    "backend",
    "class_vector",
    "latent_shell",
)


def cmd_invert(args: argparse.Namespace) -> int:
    from PIL import Image as PILImage

    targets = []
    for path in args.targets:
        if not Path(path).is_file():
            raise errors.InvalidArgument(f"{path}: no such file")
        targets.append(path)
    given = _given(args, _INVERT_OPTIONS)
    options = cast(InversionOptions, given)
    if args.conditioned_class is not None:
        options["conditioned_class"] = _class(args.conditioned_class)
    with _client(args) as client:
        job = client.invert(targets, model=args.model, **options)
        if _announced(args, job):
            return EXIT_OK
        images = []
        for path in targets:
            with PILImage.open(path) as image:
                images.append(image.convert("RGB"))
        return _wait_and_save(args, job, images, cancel_on_interrupt=True)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = list(client.jobs(states=args.states or (), kind=args.kind, limit=args.limit))
    _emit(
        args,
        jobs,
        lambda: (
            "\n".join(
                f"{j.id}  {j.kind:12} {j.state.value:10} step {j.step}/{j.total_steps}"
                + (f"  criterion {j.criterion['total']:.4g}" if "total" in j.criterion else "")
                for j in jobs
            )
            or "no jobs"
        ),
    )
    return EXIT_OK


def cmd_jobs_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.job(args.job_id).status()
    _emit(
        args, status, lambda: f"{status.id} {status.kind} {status.state.value} step {status.step}/{status.total_steps}"
    )
    return EXIT_OK


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job_id)
        if not args.json:
            job.wait(progress=not args.quiet)
            print(f"job {job.id} succeeded")
            return EXIT_OK
        final = JobState.UNSPECIFIED
        for event in job.watch(previews=False):
            print(json.dumps({"type": type(event).__name__, **_plain(event)}), flush=True)
            if isinstance(event, StateChanged):
                final = event.state
        return EXIT_OK if final == JobState.SUCCEEDED else EXIT_JOB_FAILED


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.job(args.job_id).cancel(args.reason)
    _emit(args, status, lambda: f"cancel requested for {status.id} (now {status.state.value})")
    return EXIT_OK


def cmd_jobs_result(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job_id)
        if not args.no_wait:
            try:
                _wait(args, job, cancel_on_interrupt=False)
            except errors.JobFailed as ended:  # JobCancelled too
                return _save_best_so_far(args, job, ended)
        status = job.status()
        if status.state == JobState.CANCELLED:
            return _save_best_so_far(args, job, errors.JobCancelled(status))
        if status.state == JobState.FAILED:
            return _save_best_so_far(args, job, errors.JobFailed(status))
        return _save(args, job, None)


def _save_best_so_far(args: argparse.Namespace, job: Job, ended: errors.JobFailed) -> int:
    """A cancelled job, or one past its time limit, keeps the best result it found: printed and saved as a finished
    job's is, while the exit code (6) still says that the job did not succeed. One that kept none raises `ended`."""
    try:
        _save(args, job, None, state=ended.status.state.value)
    except errors.FailedPrecondition:  # no result kept: it failed before its first
        raise ended from None
    return EXIT_JOB_FAILED


# `gansteer evolve` options passed to `Client.evolve` under the same name when given.
_EVOLVE_OPTIONS = ("mu", "offspring", "mutation_rate", "rounds", "seed", "round_expiry_s")


def _terminal_rater(out: Path) -> Callable[[Round], Answer]:
    """A person at the terminal: each round is saved as a numbered grid, the answer is typed."""

    def rater(round: Round) -> Answer:
        path = out / f"round-{round.round:03d}.png"
        images = round.images()
        image_grid([images[start : start + 7] for start in range(0, len(images), 7)], cell=64).save(path)
        prompt = (
            f"round {round.round}: {path} shows {len(round.items)} images (0 to {len(round.items) - 1}, row by row).\n"
            f"pick {round.choose} (repeats allowed), or `n` none is good, `u` undo; add `s=RATE` to set the step "
            f"size (now {round.step_size:.3g}): "
        )
        while True:
            words = input(prompt).split()
            step = [float(w[2:]) for w in words if w.startswith("s=")]
            rest = [w for w in words if not w.startswith("s=")]
            step_size = step[0] if step else None
            if rest in (["n"], ["u"]):
                return Answer(action="none_good" if rest == ["n"] else "undo", step_size=step_size)
            if len(rest) == round.choose and all(w.isdigit() and int(w) < len(round.items) for w in rest):
                return Answer(choice=[int(w) for w in rest], step_size=step_size)
            print(f"give {round.choose} numbers from 0 to {len(round.items) - 1}, or n, or u", file=sys.stderr)

    return rater


def cmd_evolve(args: argparse.Namespace) -> int:
    from gansteer.simulate import SimulatedPerson, Target

    given = _given(args, _EVOLVE_OPTIONS)
    options = cast(EvolutionOptions, given)
    if args.conditioned_class is not None:
        options["conditioned_class"] = _class(args.conditioned_class)
    if args.simulate is not None and not Path(args.simulate).is_file():
        raise errors.InvalidArgument(f"{args.simulate}: no such file")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        job = client.evolve(model=args.model, **options)
        if _announced(args, job):
            return EXIT_OK
        if args.simulate is not None:
            goal = Target(args.simulate)
            person = SimulatedPerson(
                client, goal, perceive_with=args.perceive_with, noise=args.noise, rater_id="gansteer-cli-simulated"
            )
            status = person.answer(job)
        else:
            status = job.answer_rounds(_terminal_rater(out), rater_id=args.rater)
        if status.state is not JobState.SUCCEEDED:
            raise errors.JobFailed(status)
        result = job.result(wait=False)
        saved = result.save(out, spec=job.spec())
        paths = saved.images
        document = {
            "job_id": job.id,
            "metrics": result.metrics,
            "picks": paths,
            "result": saved.path,
            "rounds": len(job.interactions()),
        }
        _emit(args, document, lambda: "\n".join([f"job {job.id} succeeded", *(str(p) for p in paths)]))
        return EXIT_OK


# `gansteer nes` options passed to `Client.human_nes` under the same name when given.
_NES_OPTIONS = (
    "basis",
    "basis_folder",
    "basis_components",
    "sigma",
    "images",
    "pairs_per_image",
    "rounds",
    "raters_per_pair",
    "answer_levels",
    "learning_rate",
    "register_as",
    "seed",
    "round_expiry_s",
    "forking_reference",
)


def _terminal_pair_rater(out: Path) -> Callable[[Round], Answer]:
    """A person at the terminal: each pair is saved side by side, the answer typed on the round's scale."""

    def rater(round: Round) -> Answer:
        images = round.images()
        levels = round.answer_levels or 5
        half = (levels - 1) / 2
        scores: list[float] = []
        for number, (left, right) in enumerate(round.pairs):
            path = out / f"round-{round.round:03d}-pair-{number:04d}.png"
            image_grid([[images[left], images[right]]], cell=128).save(path)
            prompt = f"{path}: which looks better? -{half:g} (right) to {half:g} (left), 0 a tie: "
            while True:
                text = input(prompt).strip()
                try:
                    value = float(text)
                except ValueError:
                    value = math.nan
                if math.isfinite(value) and abs(value) <= half:
                    scores.append(value / half if half else value)
                    break
                print(f"give a number from -{half:g} to {half:g}", file=sys.stderr)
        return Answer(pairwise=scores)

    return rater


def cmd_nes(args: argparse.Namespace) -> int:
    from gansteer.simulate_pairwise import PairwisePerson

    given = _given(args, _NES_OPTIONS)
    options = cast(HumanNESOptions, given)
    if args.conditioned_class is not None:
        options["conditioned_class"] = _class(args.conditioned_class)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with _client(args) as client:
        job = client.human_nes(model=args.model, **options)
        if _announced(args, job):
            return EXIT_OK
        if args.simulate is not None:
            person = PairwisePerson(client, scorer=args.simulate, noise=args.noise, rater_id="gansteer-cli-simulated")
            status = job.answer_rounds(person, rater_id=person.rater_id)
        else:
            status = job.answer_rounds(_terminal_pair_rater(out), rater_id=args.rater)
        if status.state is not JobState.SUCCEEDED:
            raise errors.JobFailed(status)
        result = job.result(wait=False)
        saved = result.save(out, spec=job.spec())
        document = {
            "job_id": job.id,
            "models": result.models,
            "metrics": result.metrics,
            "images": saved.images,
            "result": saved.path,
            "answers": len(job.interactions()),
        }
        _emit(
            args, document, lambda: "\n".join([f"job {job.id} succeeded: {', '.join(result.models)}", str(saved.path)])
        )
        return EXIT_OK


# `gansteer search` options passed to `Client.latent_search` under the same name when given.
_SEARCH_OPTIONS = (
    "optimizer",
    "learning_rate",
    "population_size",
    "budget",
    "budget_unit",
    "restarts",
    "scorer",
    "judge",
    "discriminator",
    "prior_weight",
    "perturbations",
    "seed",
    "backend",
)


def _option_value(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise errors.InvalidArgument(f"--option: {text!r} is not a number") from None


def cmd_search(args: argparse.Namespace) -> int:
    given = _given(args, _SEARCH_OPTIONS)
    options = cast(LatentSearchOptions, given)
    if args.classes:
        options["classes"] = [_class(c) for c in args.classes]
    if args.objective:
        options["objective"] = list(args.objective)
    if args.search_class:
        options["search_class_embedding"] = True
    if args.option:
        pairs = [item.split("=", 1) for item in args.option]
        if any(len(pair) != 2 for pair in pairs):
            raise errors.InvalidArgument("--option: give KEY=VALUE, e.g. sigma=0.5")
        options["optimizer_options"] = {key: _option_value(value) for key, value in pairs}
    with _client(args) as client:
        job = client.latent_search(model=args.model, **options)
        if _announced(args, job):
            return EXIT_OK
        _wait(args, job, cancel_on_interrupt=True)
        result = job.result(wait=False)
        spec = job.spec()
    document: dict[str, Any] = {"job_id": job.id, "metrics": result.metrics, "items": result.item_metrics}
    lines = [f"job {job.id} succeeded"] + [
        f"{name} {value:.4g}" for name, value in sorted(result.metrics.items()) if name not in ("steps",)
    ]
    out = _out(args, job)
    saved = result.save(out, spec=spec)
    image_grid([result.images]).save(out / "grid.png")
    np.save(out / "latents.npy", result.latents)
    (out / "metrics.json").write_text(json.dumps(_plain(document), indent=2))
    files = {"results": saved.images, "grid": out / "grid.png", "latents": out / "latents.npy"}
    document["files"] = {**files, "result": saved.path}
    lines += [f"grid: {out / 'grid.png'}", f"saved: {saved.path}"]
    for i, item in enumerate(result.item_metrics):
        shown = ("class_id", "objective", "robustness", "judge_prob", "realism")
        lines.append(f"result {i}: " + ", ".join(f"{k} {item[k]:.4g}" for k in shown if k in item))
    _emit(args, document, lambda: "\n".join(lines))
    return EXIT_OK


# `gansteer am` options passed to `Client.embedding_am` under the same name when given.
_AM_OPTIONS = (
    "target_class",
    "new_label",
    "classifier",
    "init",
    "top_k",
    "init_sigma",
    "optimizer",
    "learning_rate",
    "steps",
    "latents_per_step",
    "resample_every",
    "clamp_min",
    "clamp_max",
    "trials",
    "diversity_weight",
    "diversity_space",
    "diversity_pairs",
    "judge",
    "feature_extractor",
    "eval_samples",
    "accuracy_tolerance",
    "register_as",
    "seed",
    "backend",
)


def _am_lines(result: EmbeddingAMResult) -> list[str]:
    """The per-trial table (accuracy by the optimised classifier and the judge, diversity; `*` marks the chosen
    trial), the before/after line and the registered version."""

    def cell(metrics: Mapping[str, float], name: str) -> str:
        return f"{metrics[name]:>13.4f}" if name in metrics else f"{'-':>13}"

    columns = ("classifier_accuracy", "judge_accuracy", "ms_ssim_3s_k7", "lpips_builtin")
    header = f"{'trial':>5} {'classifier':>13} {'judge':>13} {'ms_ssim_3s_k7':>13} {'lpips_builtin':>13}"
    lines = [header]
    for i, trial in enumerate(result.trials):
        lines.append(
            f"{i:>5} " + " ".join(cell(trial.metrics, name) for name in columns) + (" *" if trial.chosen else "")
        )
    short = dict(zip(columns, ("accuracy", "judge", "ms_ssim", "lpips"), strict=True))

    def summary(metrics: Mapping[str, float]) -> str:
        return ", ".join(f"{short[name]} {metrics[name]:.4f}" for name in columns if name in metrics)

    lines.append(f"before: {summary(result.before)} -> after (trial {result.chosen}): {summary(result.after)}")
    lines.append(f"registered: {result.registered}" if result.registered else "registered: nothing (dry run)")
    return lines


def cmd_am(args: argparse.Namespace) -> int:
    given = _given(args, _AM_OPTIONS)
    options = cast(EmbeddingAMOptions, given)
    if args.dry_run:
        options["dry_run"] = True
    with _client(args) as client:
        job = client.embedding_am(model=args.generator, **options)
        if _announced(args, job):
            return EXIT_OK
        _wait(args, job, cancel_on_interrupt=True)
        result = cast(EmbeddingAMResult, job.result(wait=False))
        spec = job.spec()
    trials = [{"metrics": t.metrics, "chosen": t.chosen} for t in result.trials]
    document: dict[str, Any] = {
        "job_id": job.id,
        "trials": trials,
        "chosen": result.chosen,
        "before": result.before,
        "after": result.after,
        "registered": result.registered,
    }
    lines = [f"job {job.id} succeeded", *_am_lines(result)]
    out = _out(args, job)
    out.mkdir(parents=True, exist_ok=True)
    header = ["before", *(f"trial {i}" + (" *" if i == result.chosen else "") for i in range(len(trials)))]
    rows = [list(samples) for samples in zip(*result.grid, strict=True)]  # a column per embedding, the same z
    image_grid(rows, header=header).save(out / "grid.png")
    np.save(out / "embedding.npy", result.trials[result.chosen].embedding)
    saved = result.save(out, spec=spec)
    document["files"] = {"grid": out / "grid.png", "embedding": out / "embedding.npy", "result": saved.path}
    lines += [f"grid: {out / 'grid.png'}", f"embedding: {out / 'embedding.npy'}", f"saved: {saved.path}"]
    _emit(args, document, lambda: "\n".join(lines))
    return EXIT_OK


def cmd_up(args: argparse.Namespace) -> int:
    from gansteer.up import run_up

    return run_up(
        redis_url=args.redis_url,
        transport=args.transport,
        any_port=args.any_port,
        json_output=args.json,
        metrics=args.metrics,
    )


# --- parser -------------------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options accepted before or after the command; on subcommands they default to SUPPRESS so a value given
    before the command is not reset by the subparser."""
    default: Callable[[Any], Any] = (lambda value: value) if top else (lambda _value: argparse.SUPPRESS)
    env = os.environ.get
    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--target",
        default=default(env("GANSTEER_TARGET", DEFAULT_TARGET)),
        help="optimization service host:port (or a gateway serving all three) [GANSTEER_TARGET]",
    )
    group.add_argument(
        "--generation-target",
        default=default(env("GANSTEER_GENERATION_TARGET", "")),
        help="generation service host:port [GANSTEER_GENERATION_TARGET]",
    )
    group.add_argument(
        "--scoring-target",
        default=default(env("GANSTEER_SCORING_TARGET", "")),
        help="scoring service host:port [GANSTEER_SCORING_TARGET]",
    )
    group.add_argument("--api-key", default=default(env("GANSTEER_API_KEY", "")), help="API key [GANSTEER_API_KEY]")
    group.add_argument("--timeout", type=float, default=default(60.0), help="deadline of each call in seconds")
    group.add_argument("--json", action="store_true", default=default(False), help="machine-readable output")
    group.add_argument("-q", "--quiet", action="store_true", default=default(False), help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gansteer",
        description="Steer pretrained image generators: run a local stack, generate, invert images, manage jobs.",
        epilog="exit codes: 0 ok, 1 other error, 2 usage, 3 invalid argument, 4 not found, 5 unavailable, "
        "6 job failed or cancelled, 130 interrupted",
    )
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _common(sub, top=False)
        sub.set_defaults(run=run)
        return sub

    up = command("up", "start the local stack (three services and a worker) until Ctrl-C", cmd_up)
    up.add_argument(
        "--redis-url",
        default=os.environ.get("GANSTEER_REDIS_URL", ""),
        help="use this Redis [GANSTEER_REDIS_URL]; unset: start redis-server from PATH, else in-memory",
    )
    up.add_argument(
        "--transport",
        choices=["auto", "redis-server", "memory"],
        default="auto",
        help="force starting redis-server or the in-memory transport (default: auto)",
    )
    up.add_argument("--any-port", action="store_true", help="bind free ports instead of 50051-50053 and 9461-9464")
    up.add_argument(
        "--no-metrics", dest="metrics", action="store_false", help="serve no Prometheus metrics (default: served)"
    )

    models = command("models", "list the registered models", cmd_models)
    models.add_argument(
        "--kind", choices=["generator", "discriminator", "classifier", "pir_estimator", "feature_extractor"]
    )
    models.add_argument("--name", default="", help="only names containing this text")
    models.add_argument("--all-versions", action="store_true")

    command("kinds", "the job kinds the server runs, with their options and defaults", cmd_kinds)
    command("optimizers", "the optimizers a job spec can name", cmd_optimizers)

    generate = command(
        "generate",
        "sample images from a generator into a folder, or render a saved result again (--from)",
        cmd_generate,
    )
    generate.add_argument("model", nargs="?", help="generator, name or name@version (not with --from)")
    generate.add_argument(
        "--from",
        dest="from_result",
        metavar="SAVED",
        help="a saved result (a folder an --out wrote, or its result.json): its images rendered again by the same "
        "generator version from the same latents and classes, each compared with the saved image",
    )
    generate.add_argument("-n", type=int, default=8, help="number of images (default 8)")
    generate.add_argument(
        "--seed", type=int, help="seed of the drawn latents and classes (default: a random one, printed)"
    )
    generate.add_argument(
        "--class", dest="classes", action="append", metavar="CLASS", help="class id or name (repeat for one per image)"
    )
    generate.add_argument("--truncation", type=float)
    generate.add_argument("--out", default="out/generated", help="folder for the images (default out/generated)")

    evolve = command("evolve", "interactive evolution: pick the best images each round (HEVOL)", cmd_evolve)
    evolve.add_argument("--model", default="scenes-gen", help="generator (default scenes-gen)")
    evolve.add_argument("--mu", type=int, help="picks per round (server default 5)")
    evolve.add_argument("--offspring", type=int, help="lambda: each round shows 1 + offspring images (default 27)")
    evolve.add_argument("--mutation-rate", type=float, help="the step size (default 0.2, fixed)")
    evolve.add_argument("--rounds", type=int, default=6, help="rounds to answer (default 6; 0: until cancelled)")
    evolve.add_argument("--class", dest="conditioned_class", metavar="CLASS", help="hold this class fixed")
    evolve.add_argument("--seed", type=int)
    evolve.add_argument("--round-expiry-s", type=float)
    evolve.add_argument("--simulate", metavar="TARGET", help="let a simulated person aiming at this image answer")
    evolve.add_argument("--noise", type=float, default=0.05, help="the simulated person's noise (default 0.05)")
    evolve.add_argument("--perceive-with", default="scenes-clf", help="the simulated person's feature extractor")
    evolve.add_argument("--rater", default="", help="your rater name (the log keeps a pseudonym)")
    evolve.add_argument(
        "--out", default="out/evolve", help="round grids, the final picks and result.json (default out/evolve)"
    )
    evolve.add_argument("--no-wait", action="store_true", help="print the job id and return at once")

    nes = command("nes", "human NES: compare image pairs to tune a generator's weights (HumanGAN)", cmd_nes)
    nes.add_argument("--model", default="scenes-gen", help="generator to tune (default scenes-gen)")
    nes.add_argument("--basis", choices=("uneven", "even"), help="PCA basis of real images (default) or pixels")
    nes.add_argument("--basis-folder", metavar="FOLDER", help="real images of the PCA basis (default: scenes renders)")
    nes.add_argument("--q", dest="basis_components", type=int, help="principal components kept (default 100)")
    nes.add_argument("--sigma", type=float, help="perturbation scale (default 0.5 uneven, 0.05 even)")
    nes.add_argument("--images", type=int, help="N fixed latents per round (default 25)")
    nes.add_argument("--pairs", dest="pairs_per_image", type=int, help="R pairs per latent per round (default 10)")
    nes.add_argument("--rounds", type=int, help="rounds, one optimizer step each (default 1)")
    nes.add_argument("--raters", dest="raters_per_pair", type=int, help="raters per round (default 1)")
    nes.add_argument("--levels", dest="answer_levels", type=int, help="points of the answer scale (default 5)")
    nes.add_argument("--learning-rate", type=float, help="Adam's (default 2e-5)")
    nes.add_argument("--class", dest="conditioned_class", metavar="CLASS", help="every latent's class")
    nes.add_argument("--register-as", help="name of the tuned version (default: the generator's)")
    nes.add_argument("--seed", type=int)
    nes.add_argument("--round-expiry-s", type=float)
    nes.add_argument("--forking-reference", metavar="LATER", help="a later snapshot: report the forking analysis")
    nes.add_argument("--simulate", metavar="SCORER", help="let a simulated person judging with this scorer answer")
    nes.add_argument("--noise", type=float, default=0.5, help="the simulated person's noise (default 0.5)")
    nes.add_argument("--rater", default="", help="your rater name (the log keeps a pseudonym)")
    nes.add_argument("--out", default="out/nes", help="the pairs shown, the tuned images and result.json")
    nes.add_argument("--no-wait", action="store_true", help="print the job id and return at once")

    invert = command("invert", "find latents whose images resemble the target images", cmd_invert)
    invert.add_argument("targets", nargs="+", metavar="TARGET", help="image files")
    invert.add_argument("--model", default="scenes-gen", help="generator (default scenes-gen)")
    invert.add_argument("--criterion", help="l2, l2+features (server default) or features")
    invert.add_argument("--discriminator", help="discriminator of the realism term (default: the card's pair)")
    invert.add_argument("--optimizer", help="lbfgs (server default), adam, nesterov, random_search, CMA, ...")
    invert.add_argument(
        "--budget", type=int, default=DEFAULT_BUDGET, help="iterations, or generator calls with --budget-unit (300)"
    )
    invert.add_argument("--budget-unit", choices=["iterations", "generator_calls"], default="iterations")
    invert.add_argument("--class", dest="conditioned_class", metavar="CLASS", help="hold this class fixed")
    invert.add_argument("--restarts", type=int)
    invert.add_argument(
        "--class-vector",
        choices=["simplex", "free"],
        help="a searched class vector among the class rows (server default: results the generator would make) "
        "or anywhere (closer in pixels, off the generator's manifold for targets it cannot make)",
    )
    invert.add_argument(
        "--latent-shell",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="hold z on its prior's shell (server default: on)",
    )
    invert.add_argument("--seed", type=int, default=0)
    invert.add_argument("--learning-rate", type=float)
    invert.add_argument("--backend", choices=["local", "remote"])
    invert.add_argument(
        "--out", help="folder for targets, results, result.json (regenerates them), grid, latents (default out/JOB_ID)"
    )
    invert.add_argument("--no-wait", action="store_true", help="print the job id and return at once")

    search = command("search", "search latents whose images maximise a scorer's output (seed 002)", cmd_search)
    search.add_argument("--model", default="scenes-gen", help="generator (default scenes-gen)")
    search.add_argument(
        "--class", dest="classes", action="append", metavar="CLASS", help="target class, id or name (repeatable)"
    )
    search.add_argument(
        "--objective", action="append", metavar="OUTPUT", help="scorer output to maximise (default class_logit)"
    )
    search.add_argument("--scorer", help="model of the objective (default: the generator card's classifier)")
    search.add_argument("--judge", help="independent classifier judging the results (default: the card's judge)")
    search.add_argument("--discriminator", help="realism scorer (default: the card's pair)")
    search.add_argument("--optimizer", help="adam (default: gradient ascent), cmaes, ga, or any of `optimizers`")
    search.add_argument("--option", action="append", metavar="KEY=VALUE", help="optimizer option, e.g. sigma=0.5")
    search.add_argument("--population-size", type=int)
    search.add_argument("--learning-rate", type=float)
    search.add_argument(
        "--budget", type=int, default=SEARCH_BUDGET, help="generator calls per search, or iterations (600)"
    )
    search.add_argument("--budget-unit", choices=["iterations", "generator_calls"], default="generator_calls")
    search.add_argument("--restarts", type=int)
    search.add_argument("--search-class", action="store_true", help="search a class vector with z")
    search.add_argument("--prior-weight", type=float)
    search.add_argument("--perturbations", type=int)
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--backend", choices=["local", "remote"])
    search.add_argument(
        "--out", help="folder for results, result.json (regenerates them), grid, latents, metrics (default out/JOB_ID)"
    )
    search.add_argument("--no-wait", action="store_true", help="print the job id and return at once")

    am = command("am", "learn a class embedding a classifier recognises (embedding AM, seed 001)", cmd_am)
    am.add_argument("generator", help="class-conditional generator, name or name@version")
    target = am.add_mutually_exclusive_group(required=True)
    target.add_argument("--class", dest="target_class", metavar="NAME", help="a generator class (name or id)")
    target.add_argument("--new-label", metavar="NAME", help="a classifier label the generator lacks (e.g. dusk)")
    am.add_argument("--classifier", help="the optimised classifier (default: the generator card's)")
    am.add_argument("--init", choices=INITS, help="starting point (default: target for --class, mean otherwise)")
    am.add_argument("--top-k", type=int, help="k of --init top-k (server default 5)")
    am.add_argument("--init-sigma", type=float, help="the starting noise's standard deviation (0.1)")
    am.add_argument("--optimizer", help="a gradient optimizer (default adam)")
    am.add_argument("--learning-rate", type=float, help="default 0.01 for init target, 0.1 otherwise")
    am.add_argument("--steps", type=int, help="optimizer steps (200)")
    am.add_argument("--latents-per-step", type=int, help="latents per trial per step (20)")
    am.add_argument("--resample-every", type=int, help="redraw the latents every this many steps (20)")
    am.add_argument("--clamp-min", type=float, help="default: the embedding table's minimum")
    am.add_argument("--clamp-max", type=float, help="default: the embedding table's maximum")
    am.add_argument("--trials", type=int, help="independent trials, stepped together (5)")
    am.add_argument("--diversity-weight", type=float, help="lambda of the diversity term (0: none)")
    am.add_argument("--diversity-space", choices=["pixel", "features", "softmax"], help="its space")
    am.add_argument("--diversity-pairs", type=int, help="pairs of latents in the term per step (10)")
    am.add_argument("--judge", help="a classifier the job does not optimise (default: the cards' judge)")
    am.add_argument("--feature-extractor", help="the feature space of lpips_builtin (default: the card's)")
    am.add_argument("--eval-samples", type=int, help="samples per trial for the metrics (200)")
    am.add_argument("--accuracy-tolerance", type=float, help="accuracy given up for diversity when choosing (0.05)")
    am.add_argument("--register-as", metavar="NAME", help="register the chosen embedding under this name")
    am.add_argument("--dry-run", action="store_true", help="only report: register nothing")
    am.add_argument("--seed", type=int)
    am.add_argument("--backend", choices=["local", "remote"])
    am.add_argument(
        "--out", help="folder for grid.png (before/after), the chosen embedding.npy, result.json (default out/JOB_ID)"
    )
    am.add_argument("--no-wait", action="store_true", help="print the job id and return at once")

    cli_pir.add_commands(command, _common)

    jobs = command("jobs", "list, watch, cancel jobs and fetch their results", lambda _args: EXIT_USAGE)
    job_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="JOBS_COMMAND")

    def job_command(name: str, help_text: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = job_commands.add_parser(name, help=help_text, description=help_text)
        _common(sub, top=False)
        sub.set_defaults(run=run)
        if name != "list":
            sub.add_argument("job_id")
        return sub

    listing = job_command("list", "the caller's jobs, newest first", cmd_jobs_list)
    listing.add_argument("--state", dest="states", action="append", choices=[s.value for s in JobState][1:])
    listing.add_argument("--kind", default="")
    listing.add_argument("--limit", type=int, default=20)
    job_command("status", "one job's record", cmd_jobs_status)
    job_command("watch", "follow a job until it ends (progress bar, or JSON lines with --json)", cmd_jobs_watch)
    cancel = job_command("cancel", "ask a job to stop", cmd_jobs_cancel)
    cancel.add_argument("--reason", default="cancelled from the command line")
    result = job_command("result", "wait for a job and save its result", cmd_jobs_result)
    result.add_argument(
        "--out", help="folder for targets, results, result.json (regenerates them), grid, latents (default out/JOB_ID)"
    )
    result.add_argument("--no-wait", action="store_true", help="fail unless the job has already succeeded")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gansteer` console script; returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    # A shell starts background commands with SIGINT ignored, and Python then never raises KeyboardInterrupt: a
    # `kill -INT` from a script (or a test) must still cancel the job this command submitted, as Ctrl-C does.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `gansteer jobs watch --json | head`: the reader has what it wanted
        _silence_stdout()
        return EXIT_OK
    except (errors.GansteerError, FileNotFoundError) as error:
        code = exit_code(error)
        if args.json:
            print(json.dumps({"error": _error_document(error), "exit_code": code}))
        else:
            print(f"gansteer: {error}", file=sys.stderr)
        return code
    except Exception as error:  # a bug or an unforeseen failure: one line; the traceback on request
        if os.environ.get("GANSTEER_DEBUG"):
            raise
        print(
            f"gansteer: unexpected {type(error).__name__}: {_one_line(error)} (GANSTEER_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so that Python's flush at exit does not raise BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _error_document(error: BaseException) -> dict[str, Any]:
    document: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, errors.GansteerError):
        document["code"] = error.code.name if error.code is not None else None
        document["details"] = [asdict(d) for d in error.details]
    if isinstance(error, errors.JobFailed):
        document["job_id"] = error.status.id
        document["state"] = error.status.state.value
    return document


if __name__ == "__main__":
    sys.exit(main())
