"""Command line: python -m trainer train | eval | versions | activate | rollback.

Errors a user can fix (bad path, no data, unknown version, bad project name, bad checkpoint) print one line on
stderr and exit with code 2. With --json the last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad option value."""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", required=True, help="project name (letters, digits, '_', '.', '-')")
    parser.add_argument("--model-dir", default=os.environ.get("MODEL_DIR", "models"),
                        help="where versions and the embedding cache live (env MODEL_DIR, default ./models)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=os.environ.get("SAM_MODEL", "lite_medsam"), help="SAM variant")
    parser.add_argument("--checkpoint", default=os.environ.get("SAM_CHECKPOINT"), help="weights file")
    parser.add_argument("--data", required=True,
                        help="COCO folder, Label Studio JSON export file, or ls://<project id> "
                             "(with env LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    from .finetune import LOSSES, FineTuneConfig

    defaults = FineTuneConfig()
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune the mask decoder; promote the result if it wins on val")
    _model_args(train)
    _common(train)
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--loss", choices=LOSSES, default=defaults.loss,
                       help="dice-bce (default), dice-focal (focal instead of BCE, 20:1 as in SAM's paper) or "
                            "seed-mse (the popular recipe; its gradient is zero: a baseline)")
    train.add_argument("--max-objects-per-image", type=int, default=defaults.max_objects_per_image)
    train.add_argument("--max-objects-per-epoch", type=int, default=defaults.max_objects_per_epoch)
    train.add_argument("--patience", type=int, default=defaults.patience)
    train.add_argument("--box-jitter", type=float, default=defaults.box_jitter)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--margin", type=float, default=defaults.margin,
                       help="val mIoU the new decoder must gain over the active one to be promoted")
    train.add_argument("--val-fraction", type=float, default=0.2, help="hash split when the data has none")
    train.add_argument("--keep-last", type=int, default=5, help="versions kept by pruning (plus the active one)")

    evaluate = commands.add_parser("eval", help="box-prompted mIoU of a version on a data split")
    _model_args(evaluate)
    _common(evaluate)
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test")
    evaluate.add_argument("--version", default="active", help="a version id, 'active' or 'base'")
    evaluate.add_argument("--val-fraction", type=float, default=0.2)

    versions = commands.add_parser("versions", help="list a project's versions")
    _common(versions)
    activate = commands.add_parser("activate", help="serve a version ('base': the base model)")
    activate.add_argument("version")
    _common(activate)
    rollback = commands.add_parser("rollback", help="re-activate the previously active version")
    _common(rollback)
    return parser


def _load_segmenter(args: argparse.Namespace):
    from .models import load_model
    from .runtime import Segmenter

    return Segmenter(load_model(args.model, args.checkpoint))


def _load_data(args: argparse.Namespace):
    """--data through the backend's image rules: LABEL_STUDIO_URL / _API_KEY, ALLOWED_IMAGE_HOSTS,
    ALLOW_PRIVATE_IMAGE_HOSTS (the same environment variables the backend reads). Label Studio's JSON is
    read by the backend's edge module (ml_backend.annotations); the CLI is an edge too."""
    from ml_backend.annotations import load_data

    from .images import ImageSource, parse_allowed_hosts

    try:
        hosts = parse_allowed_hosts(os.environ.get("ALLOWED_IMAGE_HOSTS", ""))
    except ValueError as exc:
        raise UsageError(f"ALLOWED_IMAGE_HOSTS: {exc}") from exc
    allow_private = os.environ.get("ALLOW_PRIVATE_IMAGE_HOSTS", "").strip().lower() in ("1", "true", "yes", "on")
    source = ImageSource(os.environ.get("LABEL_STUDIO_URL") or None, os.environ.get("LABEL_STUDIO_API_KEY") or None,
                         allowed_hosts=hosts, allow_private=allow_private)
    return load_data(args.data, source, val_fraction=args.val_fraction)


def cmd_train(args: argparse.Namespace, registry) -> dict:
    from .finetune import FineTuneConfig, train_and_register

    if args.epochs < 1 or args.max_objects_per_image < 1 or args.lr <= 0:
        raise UsageError("--epochs and --max-objects-per-image must be >= 1 and --lr > 0")
    config = FineTuneConfig(epochs=args.epochs, lr=args.lr, loss=args.loss, seed=args.seed, margin=args.margin,
                            max_objects_per_image=args.max_objects_per_image, patience=args.patience,
                            max_objects_per_epoch=args.max_objects_per_epoch, box_jitter=args.box_jitter)
    dataset = _load_data(args)
    segmenter = _load_segmenter(args)
    report = train_and_register(segmenter, dataset, registry, args.model_dir, config, progress=sys.stderr.isatty())
    report["data"] = dataset.summary
    return report


def cmd_eval(args: argparse.Namespace, registry) -> dict:
    from .cache import DiskEmbeddings
    from .data import DataError
    from .finetune import TrainingEmbeddings, evaluate
    from .registry import RegistryError
    from .runtime import BASE_VERSION

    version = registry.active() if args.version == "active" else None if args.version == "base" else args.version
    manifest = registry.manifest(version) if version is not None else {}
    dataset = _load_data(args)
    images = dataset.split(args.split)
    if not images:
        raise DataError(f"the data has no {args.split} split images ({args.data})")
    segmenter = _load_segmenter(args)
    decoder = None
    if version is not None:
        trained_on = manifest.get("base_model", {}).get("identity")
        if trained_on != segmenter.model.identity:
            raise RegistryError(f"version {version} was trained on base model {trained_on}, "
                                f"not {segmenter.model.identity}")
        decoder = segmenter.fine_tuned_decoder(registry.load_decoder(version))
    embeddings = TrainingEmbeddings(segmenter, DiskEmbeddings(Path(args.model_dir) / "embeddings"))
    result = evaluate(segmenter, embeddings, images, decoder)
    return {"version": version or BASE_VERSION, "model_version": segmenter.model_version(version or BASE_VERSION),
            "split": args.split, **result}


def cmd_versions(args: argparse.Namespace, registry) -> dict:
    active = registry.active()
    rows = []
    for info in registry.versions():
        metrics = info.manifest.get("metrics", {})
        rows.append({"version": info.version, "active": info.version == active, "promoted": info.promoted,
                     "created_at": info.manifest.get("created_at"), "parent": info.manifest.get("parent"),
                     "val_miou_base": metrics.get("val_miou_base"), "val_miou_new": metrics.get("val_miou_new"),
                     "loss": info.manifest.get("hyperparameters", {}).get("loss"),
                     "reason": info.manifest.get("reason")})
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
            print(f"{mark} {row['version']}  {row['created_at']}  val mIoU {row['val_miou_base']} -> "
                  f"{row['val_miou_new']}  {'promoted' if row['promoted'] else 'not promoted'}")
    elif command == "train":
        print(f"{report['version']}: {'promoted' if report['promoted'] else 'not promoted'} ({report['reason']})")
    elif command == "eval":
        print(f"{report['version']} on {report['split']}: mIoU {report['miou']} over {report['n_objects']} objects")
        for name, group in {**report["per_label"], **report["by_size"]}.items():
            print(f"  {name}: {group['miou']} ({group['n_objects']})")
    else:
        print(f"project {report['project']}: active {report['active'] or 'base'}")


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = os.environ.get("TORCH_THREADS", "")
    if threads.isdigit() and int(threads) > 0:  # same setting as serving's workers
        import torch

        torch.set_num_threads(int(threads))
    from .data import DataError
    from .models import ModelLoadError
    from .registry import Registry, RegistryError

    commands = {"train": cmd_train, "eval": cmd_eval, "versions": cmd_versions, "activate": cmd_activate,
                "rollback": cmd_rollback}
    try:
        registry = Registry(args.model_dir, args.project, keep_last=getattr(args, "keep_last", 5))
        report = commands[args.command](args, registry)
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


if __name__ == "__main__":
    sys.exit(main())
