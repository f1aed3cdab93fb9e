"""The command line: python -m ml_backend train | eval | versions | activate | rollback | connect | prelabel | worker | jobs.

Every command reads the backend's settings (environment variables, README "Settings"): MODEL_DIR, SAM_MODEL,
SAM_CHECKPOINT(_SHA256), DEVICE, TORCH_THREADS, LABEL_STUDIO_URL / _API_KEY and the image rules and limits;
flags override some of them. Errors a user can fix (bad path, no data, unknown version, bad project name, bad
checkpoint) print one line on stderr and exit with code 2. `train` and `prelabel` take the project's lock (the one
training jobs hold): while a job of the project runs they wait, saying so on stderr, or with --no-wait refuse
with exit code 3. With --json the last stdout line is one JSON object. Logs go to stderr as JSON lines, like
the server's (`--log-format text` for people; LOG_FORMAT sets the default). A command imports only what it needs:
`connect` never loads torch.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Iterator

from .logs import FORMATS, configure
from .settings import Settings

EXIT_USAGE = 2
EXIT_BUSY = 3  # --no-wait and the project's lock is held (a job of the project runs)


class UsageError(Exception):
    """A bad option value."""


class ProjectBusy(Exception):
    """--no-wait, and a job (or another command) of the project holds its lock."""


def _common(parser: argparse.ArgumentParser, settings: Settings) -> None:
    parser.add_argument("--project", required=True, help="project name (letters, digits, '_', '.', '-')")
    parser.add_argument("--model-dir", type=Path, default=settings.model_dir,
                        help="where versions and the embedding cache live (default: $MODEL_DIR, else ./models)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")


def _model_args(parser: argparse.ArgumentParser, settings: Settings) -> None:
    parser.add_argument("--model", default=settings.sam_model, help="SAM variant (default: $SAM_MODEL)")
    parser.add_argument("--checkpoint", default=settings.sam_checkpoint, help="weights file (default: $SAM_CHECKPOINT)")
    parser.add_argument("--data", required=True,
                        help="COCO folder, Label Studio JSON export file, or ls://<project id> (LABEL_STUDIO_URL and "
                             "LABEL_STUDIO_API_KEY, else the connection Label Studio's /setup gave the backend)")


COMMANDS = ("train", "eval", "versions", "activate", "rollback", "connect", "prelabel", "jobs", "worker")


def command_of(argv: list[str]) -> str | None:
    """The command named in argv (None when there is none yet: `python -m ml_backend -h`)."""
    return next((arg for arg in argv if arg in COMMANDS), None)


def build_parser(settings: Settings, command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line. `train`'s options take their defaults from the training code, which loads torch:
    they are added only when `command` is train or not known yet (`-h`)."""
    from . import connect

    parser = argparse.ArgumentParser(prog="python -m ml_backend", description=__doc__.splitlines()[0])
    parser.add_argument("--log-format", choices=FORMATS, default=settings.log_format,
                        help="log lines on stderr: json (default: $LOG_FORMAT, else json) or text")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune the mask decoder; promote the result if it wins on val")
    _model_args(train, settings)
    _common(train, settings)
    if command in (None, "train"):
        _train_options(train, settings)

    evaluate = commands.add_parser("eval", help="box-prompted mIoU of a version on a data split")
    _model_args(evaluate, settings)
    _common(evaluate, settings)
    evaluate.add_argument("--split", choices=("train", "val", "test"),
                          help="default: test when the data has a test split, else val (held out from training)")
    evaluate.add_argument("--version", default="active", help="a version id, 'active' or 'base'")
    evaluate.add_argument("--val-fraction", type=float, default=0.2)

    versions = commands.add_parser("versions", help="list a project's versions")
    _common(versions, settings)
    activate = commands.add_parser("activate", help="serve a version ('base': the base model)")
    activate.add_argument("version")
    _common(activate, settings)
    rollback = commands.add_parser("rollback", help="re-activate the previously active version")
    _common(rollback, settings)

    connect.add_arguments(commands.add_parser(
        "connect", help="connect the backend to Label Studio projects (idempotent)",
        description=connect.__doc__.split("\n\n")[0]), settings)
    prelabel = commands.add_parser("prelabel", help="pre-label a Label Studio project: every task with boxes gets "
                                   "a mask prediction of the served version (resumable)")
    prelabel.add_argument("--project", required=True, type=int, help="Label Studio project id")
    prelabel.add_argument("--json", action="store_true", help="print the job record as one JSON line")
    prelabel.add_argument("--no-wait", action="store_true",
                          help="refuse (exit code 3) instead of waiting while a job of the project runs")
    jobs = commands.add_parser("jobs", help="running and recent training / pre-labelling jobs (with REDIS_URL: "
                               "of every host): which worker runs what, since when, progress")
    jobs.add_argument("--project", help="only this project's jobs")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    worker = commands.add_parser("worker", help="run due training jobs forever (the training worker)")
    worker.add_argument("--job", type=int, metavar="ID", help="run one claimed job (what the dispatcher starts)")
    return parser


def _train_options(train: argparse.ArgumentParser, settings: Settings) -> None:
    from trainer.finetune import FineTuneConfig
    from trainer.losses import LOSSES

    defaults = FineTuneConfig()
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--loss", choices=list(LOSSES), default=defaults.loss,
                       help="dice-bce (default), dice-focal (focal instead of BCE, 20:1 as in SAM's paper) or "
                            "seed-mse (the popular recipe; its gradient is zero: a baseline)")
    train.add_argument("--max-objects-per-image", type=int, default=defaults.max_objects_per_image)
    train.add_argument("--max-objects-per-epoch", type=int, default=defaults.max_objects_per_epoch)
    train.add_argument("--patience", type=int, default=defaults.patience)
    train.add_argument("--box-jitter", type=float, default=defaults.box_jitter)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--margin", type=float, default=defaults.margin,
                       help="gate-set mIoU the new decoder must gain over the active one to be promoted")
    train.add_argument("--val-fraction", type=float, default=0.2, help="hash split when the data has none")
    train.add_argument("--keep-last", type=int, default=settings.keep_versions,
                       help="versions kept by pruning (plus the active one; default: $KEEP_VERSIONS)")
    train.add_argument("--no-wait", action="store_true",
                       help="refuse (exit code 3) instead of waiting while a job of the project runs")


def _load_segmenter(args: argparse.Namespace):
    from .backend import build_segmenter

    return build_segmenter(args.settings, serving=False)


def _load_data(args: argparse.Namespace):
    """--data, with images fetched under the backend's rules and limits (the same Settings). ls://<id> reaches
    Label Studio as the backend does for that project: LABEL_STUDIO_URL / _API_KEY, else (or when that key is
    rejected) the connection its /setup gave the backend under MODEL_DIR, as `prelabel` does."""
    from .annotations import load_data
    from .fetch import image_source

    ls_project = args.data[len("ls://"):].strip("/") if args.data.startswith("ls://") else None
    if ls_project is not None and args.settings.label_studio_url and args.settings.label_studio_api_key:
        from .credentials import check_and_log

        check_and_log(args.settings, attempts=1)  # a rejected key: one clear line, then /setup's token if any
    try:
        source = image_source(args.settings, ls_project if ls_project and ls_project.isdigit() else None)
    except ValueError as exc:
        raise UsageError(f"ALLOWED_IMAGE_HOSTS: {exc}") from exc
    if ls_project and ls_project.isdigit() and not (source.label_studio_url and source.token):
        raise UsageError(f"{args.data} needs Label Studio's URL and a token: set LABEL_STUDIO_URL and "
                         f"LABEL_STUDIO_API_KEY, or connect project {ls_project} to this backend in Label Studio "
                         f"(its /setup call leaves them under {args.settings.model_dir}, the --model-dir to use)")
    return load_data(args.data, source, val_fraction=args.val_fraction)


def cmd_train(args: argparse.Namespace, registry) -> dict:
    from trainer.finetune import FineTuneConfig, train_and_register

    if args.epochs < 1 or args.max_objects_per_image < 1 or args.lr <= 0:
        raise UsageError("--epochs and --max-objects-per-image must be >= 1 and --lr > 0")
    config = FineTuneConfig(epochs=args.epochs, lr=args.lr, loss=args.loss, seed=args.seed, margin=args.margin,
                            max_objects_per_image=args.max_objects_per_image, patience=args.patience,
                            max_objects_per_epoch=args.max_objects_per_epoch, box_jitter=args.box_jitter)
    with _project_lock(args, "python -m ml_backend train"):
        dataset = _load_data(args)
        segmenter = _load_segmenter(args)
        report = train_and_register(segmenter, dataset, registry, args.settings.model_dir, config,
                                    progress=sys.stderr.isatty())
    report["data"] = dataset.summary
    return report


@contextlib.contextmanager
def _project_lock(args: argparse.Namespace, what: str) -> Iterator[None]:
    """Hold the project's lock (the one its training jobs hold) around a command: wait for a running job of
    the project, saying so on stderr, or raise ProjectBusy with --no-wait. Other projects' jobs do not block."""
    from trainer.jobs import describe_busy

    from .training import jobs

    runner = jobs(args.settings)

    def busy() -> str:
        return describe_busy(runner.store, args.settings.model_dir, args.project)

    def waiting() -> None:
        print(f"{busy()}; waiting for it to end (--no-wait: refuse instead)", file=sys.stderr, flush=True)

    with runner.lock(args.project, what, 0 if args.no_wait else float("inf"), waiting) as held:
        if not held:
            raise ProjectBusy(f"{busy()}; not training (retry later, or without --no-wait to wait for it)")
        yield


def cmd_eval(args: argparse.Namespace, registry) -> dict:
    from trainer.cache import DiskEmbeddings
    from trainer.calibration import Calibration
    from trainer.data import DataError
    from trainer.finetune import TrainingEmbeddings, evaluate
    from trainer.runtime import BASE_VERSION

    version = registry.active() if args.version == "active" else None if args.version == "base" else args.version
    dataset = _load_data(args)
    if args.split is None:  # a Label Studio project has train/val only (a hash split): val is what training held out
        args.split = "test" if dataset.split("test") else "val"
    images = dataset.split(args.split)
    if not images:
        raise DataError(f"the data has no {args.split} split images ({args.data})")
    segmenter = _load_segmenter(args)
    decoder, calibration = None, None
    if version is not None:
        registry.check_base_model(version, segmenter.model.identity)
        decoder = segmenter.fine_tuned_decoder(registry.load_decoder(version))
        calibration = Calibration.from_dict(registry.manifest(version).get("calibration"))
    embeddings = TrainingEmbeddings(segmenter, DiskEmbeddings(args.settings.model_dir / "embeddings"))
    result = evaluate(segmenter, embeddings, images, decoder, calibration=calibration)
    return {"version": version or BASE_VERSION, "model_version": segmenter.model_version(version or BASE_VERSION),
            "split": args.split, **result}


def cmd_versions(args: argparse.Namespace, registry) -> dict:
    active = registry.active()
    rows = []
    for info in registry.versions():
        rows.append({**info.summary(), "active": info.version == active})
    return {"project": args.project, "active": active, "versions": rows}


def cmd_activate(args: argparse.Namespace, registry) -> dict:
    registry.activate(None if args.version == "base" else args.version)
    return {"project": args.project, "active": registry.active()}


def cmd_rollback(args: argparse.Namespace, registry) -> dict:
    return {"project": args.project, "active": registry.rollback()}


def _print_human(command: str, report: dict) -> None:
    if command == "versions":
        print(f"project {report['project']}: active {report['active'] or 'base'}")
        for row in report["versions"]:
            mark = "*" if row["active"] else " "
            print(f"{mark} {row['version']}  {row['created_at']}  gate mIoU {row['gate_miou_current']} -> "
                  f"{row['gate_miou_new']}  score: Spearman {row['spearman_object']} (objects) "
                  f"{row['spearman_task']} (tasks), ECE {row['ece']}  "
                  f"{'promoted' if row['promoted'] else 'not promoted'}")
    elif command == "train":
        print(f"{report['version']}: {'promoted' if report['promoted'] else 'not promoted'} ({report['reason']})")
    elif command == "eval":
        print(f"{report['version']} on {report['split']}: mIoU {report['miou']} over {report['n_objects']} objects")
        for name, group in {**report["per_label"], **report["by_size"]}.items():
            print(f"  {name}: {group['miou']} ({group['n_objects']})")
        score = report["score"]
        print(f"  score: Spearman {score.get('spearman_object')} (objects) {score.get('spearman_task')} (tasks), "
              f"ECE {score.get('ece')}, AUROC bad masks {score.get('auroc_bad')}, bad masks in the lowest-scored "
              f"10/20/30% of objects {list((score.get('bad_found_objects') or {}).values())}, "
              f"of tasks {list((score.get('bad_found_tasks') or {}).values())}")
    else:
        print(f"project {report['project']}: active {report['active'] or 'base'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    settings = Settings.from_env()
    args = build_parser(settings, command_of(argv)).parse_args(argv)
    configure(settings.log_level, args.log_format)
    changed = {"model_dir": getattr(args, "model_dir", None), "sam_model": getattr(args, "model", None),
               "sam_checkpoint": getattr(args, "checkpoint", None)}
    args.settings = dataclasses.replace(settings, **{k: v for k, v in changed.items() if v is not None})
    if args.command in ("connect", "worker", "prelabel", "jobs"):
        return _edge_command(args)
    from trainer.data import DataError
    from trainer.models import ModelLoadError
    from trainer.registry import Registry, RegistryError

    commands = {"train": cmd_train, "eval": cmd_eval, "versions": cmd_versions, "activate": cmd_activate,
                "rollback": cmd_rollback}
    try:
        registry = Registry(args.settings.model_dir, args.project, keep_last=getattr(args, "keep_last", 5))
        report = commands[args.command](args, registry)
    except ProjectBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except (DataError, RegistryError, ModelLoadError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # e.g. an unwritable --model-dir
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report, default=str))
    else:
        _print_human(args.command, report)
    return 0


def _edge_command(args: argparse.Namespace) -> int:
    from . import connect

    if args.command == "connect":
        return connect.run(args)
    from . import training

    if args.command == "prelabel":
        from .backend import build_segmenter
        from .credentials import check_and_log

        if args.settings.label_studio_url and args.settings.label_studio_api_key:
            check_and_log(args.settings, attempts=1)  # a rejected key: one clear line, then /setup's token if any

        job_id, code = training.prelabel_now(args.settings, str(args.project), build_segmenter(args.settings),
                                             wait_s=0 if args.no_wait else 6 * 3600)
        if job_id is None:
            return code
        job = training.job_store(args.settings).job(job_id)
        if args.json:
            print(json.dumps(job.as_dict(), default=str))
        elif job.state == "succeeded":
            print("project {project}: {predicted} tasks pre-labelled with {model_version}, {skipped} had it, "
                  "{no_boxes} without boxes, {failed} failed".format(**job.result))
        else:
            print(f"error: job {job_id} {job.state}: {job.error}", file=sys.stderr)
        return code
    if args.command == "jobs":
        return _jobs(args)
    if args.job is not None:
        from .backend import build_segmenter

        return training.run_one_job(args.settings, args.job, build_segmenter(args.settings, serving=False))
    from .credentials import check_at_start

    check_at_start(args.settings)  # the training worker: one line on the configured key, as the backend's workers
    return training.serve(args.settings)


def _jobs(args: argparse.Namespace) -> int:
    """`jobs`: every running job (of every host with REDIS_URL) and the recent ones, newest first."""
    import time

    from . import training

    runner = training.jobs(args.settings)
    store = runner.store
    runner.reap()
    rows = [job.as_dict() for job in store.jobs(args.project, limit=max(1, args.limit))]
    for row in rows:
        row["progress"] = store.progress(row["id"]) if row["state"] == "running" else None
    if args.json:
        print(json.dumps({"runner": args.settings.runner, "jobs": rows}, default=str))
        return 0
    clock = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else "-"  # noqa: E731
    for row in rows:
        where = row["worker"] or (f"pid {row['pid']}" if row["pid"] else "-")
        extra = f"  progress {row['progress']}" if row["progress"] else f"  {row['error']}" if row["error"] else ""
        print(f"job {row['id']}  project {row['project']}  {row['kind']}  {row['state']}  {where}  "
              f"since {clock(row['started_at'] or row['created_at'])}{extra}")
    return 0
