"""The ``c2p`` command. Each subcommand builds Settings once and hands them down."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("c2p")

# The project's own loggers speak at INFO; every library's (highdicom's nine lines per SEG, exporters' rewrites,
# ONNX Runtime's) only from WARNING, unless --verbose.
OWN_LOGGERS = ("c2p", "service", "models")
# pydicom logs header values it finds odd (names, dates): patient data must never reach the logs, not even verbose.
SILENT_LOGGERS = ("pydicom",)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in SILENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def cmd_export(args: argparse.Namespace) -> int:
    from models.export import export_model

    card = export_model(args.model, args.out, check=not args.no_check)
    print(
        json.dumps(
            {
                "out": str(args.out),
                "variant": card["variant"],
                "digest": card["digest"],
                "weights": card["weights"].get("source"),
                "parity": card.get("parity"),
            },
            indent=2,
        )
    )
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    """A checkpoint of the reference implementation (Yundi218/Concept-to-Pixel) as ours: NAME.safetensors + card."""
    from models.checkpoint import read_card
    from models.reference import import_reference

    weights = import_reference(args.checkpoint, args.out, args.variant)
    card = read_card(weights)
    print(
        json.dumps({"weights": str(weights), "variant": card["config"]["name"], "imported": card["imported"]}, indent=2)
    )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """The export folder a worker serves, written to --out: what an image bakes in at build time."""
    import shutil
    import tempfile

    from service.worker.artifacts import ensure_artifact

    settings = _service_settings(args)
    out = Path(args.out)
    if out.exists():
        raise ValueError(f"{out} exists; c2p prepare writes a new folder")
    with tempfile.TemporaryDirectory() as cache:
        folder = ensure_artifact(settings.model, Path(cache), args.kind)
        shutil.copytree(folder, out)
    card = json.loads((out / "card.json").read_text())
    print(json.dumps({"out": str(out), "variant": card["variant"], "digest": card["digest"]}, indent=2))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """The models this configuration serves (C2P_MODEL and C2P_MODEL_REPOSITORY), from their cards alone: name,
    version, digest and the stream their jobs go to (what a Helm worker pool's lanes must name)."""
    from service.queue.keys import lane_of
    from service.repository import entries, readable

    settings = _service_settings(args)
    if args.repository is not None:
        settings = settings.model_copy(update={"model_repository": args.repository})
    known = readable(settings.model, settings.model_repository, settings.engine.kind)
    rows = [
        {**m, "lane": lane_of(m["digest"]), "stream": f"{settings.queue.prefix}:jobs:{lane_of(m['digest'])}"}
        for m in known
    ]
    unread = len(entries(settings.model, settings.model_repository)) - len(known)
    print(json.dumps({"models": rows, "not_described": unread}, indent=2))
    if unread:
        log.warning("%d model(s) have no export card yet (a checkpoint): `c2p prepare` or `c2p export` one", unread)
    return 0


def _service_settings(args: argparse.Namespace):
    from service.config import load_settings

    return load_settings(
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        grpc_port=getattr(args, "grpc_port", None),
        redis_url=getattr(args, "redis_url", None),
        model=getattr(args, "model", None),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from service.runner import serve

    serve(_service_settings(args))
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from service.runner import serve

    settings = _service_settings(args)
    if settings.redis_url is None:
        raise ValueError("c2p gateway needs a shared Redis: set C2P_REDIS_URL or --redis-url")
    serve(settings, worker=False)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.runner import serve

    settings = _service_settings(args)
    if settings.redis_url is None:
        raise ValueError("c2p worker needs a shared Redis: set C2P_REDIS_URL or --redis-url")
    serve(settings, gateway=False)
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from service.runner import load_warm_engine
    from service.segment import parse_formats, segment

    settings = _service_settings(args)
    formats = parse_formats(args.format)
    engine = load_warm_engine(settings)
    summary, failures = segment(
        engine, settings, args.inputs, args.out, formats, modality=args.modality, progress=not args.quiet
    )
    print(json.dumps(summary, indent=2))
    return 1 if failures else 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.train.config import load_train_config
    from models.train.trainer import Trainer

    trainer = Trainer(load_train_config(args.config), resume=args.resume, progress=not args.quiet)
    path = trainer.run(until=args.until)
    print(json.dumps({"checkpoint": str(path), "step": trainer.step}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate

    if args.through_service:
        from service.evaluation import evaluate_through_service

        report = evaluate_through_service(args.model, args.data, args.json, limit=args.limit)
        print(json.dumps(report["summary"], indent=2))
        return 0
    if args.aspect:
        from models.evaluate.aspect import evaluate_aspect

        report = evaluate_aspect(args.model, args.data, args.json, batch=args.batch, limit=args.limit)
        print(json.dumps(report["summary"], indent=2))
        return 0
    report = evaluate(
        args.model, args.data, args.json, report_dir=args.report, batch=args.batch, calibration=args.calibration
    )
    print(json.dumps(report["summary"], indent=2))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from models.data.synth import write_benchmark

    paths = write_benchmark(
        args.out, seed=args.seed, n_train=args.train, n_test=args.test, size=args.size, workers=args.workers,
        progress=True,
    )  # fmt: skip
    print(json.dumps({"out": str(args.out), "datasets": [p.name for p in paths]}, indent=2))
    return 0


def cmd_data_foreign(args: argparse.Namespace) -> int:
    from models.evaluate.foreign import write_foreign

    folders = write_foreign(args.out, seed=args.seed, n=args.test, size=args.size)
    print(json.dumps({"datasets": [str(f) for f in folders]}))
    return 0


def cmd_data_mni_wm(args: argparse.Namespace) -> int:
    from models.data.mni_wm import write_mni_white_matter

    path = write_mni_white_matter(args.out, size=args.size, seed=args.seed)
    print(json.dumps({"dataset": str(path)}))
    return 0


def cmd_ship(args: argparse.Namespace) -> int:
    from models.ship import ship

    if args.graph_only:
        from models.export.strip import ship_graph

        card = ship_graph(Path(args.checkpoint), args.out)
        print(json.dumps({"graph_digest": card["digest"], "weights_data": card["weights_data"]["sha256"]}))
        return 0
    if not args.eval:
        raise ValueError("c2p ship needs --eval (the JSON c2p evaluate wrote), unless --graph-only")
    provenance = json.loads(Path(args.provenance).read_text()) if args.provenance else {}
    weights = (
        ship(args.checkpoint, args.eval, provenance, args.out)
        if args.out
        else ship(args.checkpoint, args.eval, provenance)
    )
    print(json.dumps({"weights": str(weights), "bytes": weights.stat().st_size}))
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    from service.auth import entry_for, new_key

    key = new_key()
    entry = entry_for(args.tenant, key)
    # The key goes to the client once; only the entry (its digest) is stored in C2P_API_KEYS or the keys file.
    print(json.dumps({"tenant": args.tenant, "key": key, "entry": entry}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="c2p", description="Prompt-free universal medical image segmentation (C2P).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def service_flags(command: argparse.ArgumentParser, http: bool = True) -> None:
        if http:
            command.add_argument("--host", help="bind address (default 127.0.0.1)")
            command.add_argument("--port", type=int, help="REST port (default 8000)")
            command.add_argument("--grpc-port", type=int)
        command.add_argument("--redis-url", help="shared Redis (default for serve: a private redis-server)")
        command.add_argument("--model", help="variant name, checkpoint (.safetensors) or export folder")

    serve = commands.add_parser("serve", help="run gateway + worker (+ a private Redis): the embedded service")
    service_flags(serve)
    serve.set_defaults(func=cmd_serve)
    gateway = commands.add_parser("gateway", help="run only the HTTP gateway against a shared Redis")
    service_flags(gateway)
    gateway.set_defaults(func=cmd_gateway)
    worker = commands.add_parser("worker", help="run only a worker against a shared Redis")
    service_flags(worker, http=False)
    worker.set_defaults(func=cmd_worker)
    seg = commands.add_parser("segment", help="segment local files with the service's pipeline (no server)")
    seg.add_argument("inputs", nargs="+", type=Path, help="files, or folders each holding one DICOM series")
    seg.add_argument("--out", type=Path, required=True, help="output folder: <input name>.json and more")
    seg.add_argument("--format", default="json", help="comma-separated: json,dicom-seg,nifti,png (default json)")
    seg.add_argument("--modality", help="hint for NIfTI/PNG/JPEG inputs, e.g. CT, MR, US")
    seg.add_argument("--model", help="variant name, checkpoint (.safetensors) or export folder")
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    seg.set_defaults(func=cmd_segment)

    models = commands.add_parser(
        "models", help="list the models this configuration serves, with the stream (lane) each one's jobs go to"
    )
    models.add_argument("--model", help="the default model: variant name, checkpoint or export folder")
    models.add_argument("--repository", type=Path, help="a model repository (NAME/VERSION/ export folders)")
    models.set_defaults(func=cmd_models)

    prepare = commands.add_parser(
        "prepare", help="write the export folder a worker serves (the shipped graph with its weights; no torch)"
    )
    prepare.add_argument("--model", help="variant name, checkpoint (.safetensors) or export folder")
    prepare.add_argument("--out", required=True, type=Path, help="a new folder: model.onnx, weights.bin, card.json")
    prepare.add_argument("--kind", default="onnx", choices=("onnx", "torchscript"), help="engine (torchscript: torch)")
    prepare.set_defaults(func=cmd_prepare)

    export = commands.add_parser("export", help="write model.onnx, model.ts and card.json for a model")
    export.add_argument("--model", required=True, help="variant name (e.g. c2p-femto-256) or checkpoint path")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--no-check", action="store_true", help="skip the parity check against eager PyTorch")
    export.set_defaults(func=cmd_export)

    imported = commands.add_parser(
        "import-reference", help="a checkpoint of the reference code (Yundi218/Concept-to-Pixel) as ours, with its card"
    )
    imported.add_argument("checkpoint", type=Path, help="torch.save(model.state_dict()) of the reference's C2P (.pth)")
    imported.add_argument("--out", required=True, type=Path, help="NAME.safetensors (its card NAME.json beside it)")
    imported.add_argument("--variant", default="base", help="the reference's model size (only base exists)")
    imported.set_defaults(func=cmd_import_reference)

    train = commands.add_parser("train", help="train a C2P model from a TOML config (resumable)")
    train.add_argument("--config", required=True, help="TOML file: [model] [data] [train] [loss] [augment]")
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors if present")
    train.add_argument("--until", type=int, help="stop after this step (the schedule still spans all steps)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="Dice/IoU per dataset, consensus vs one view, reliability")
    evaluate.add_argument("--model", required=True, help="variant name or checkpoint (.safetensors)")
    evaluate.add_argument(
        "--data", required=True, action="append", help="a dataset folder or a root of several (repeatable)"
    )
    evaluate.add_argument(
        "--calibration", help="data to fit the reliability levels and concept threshold on (never the test split)"
    )
    evaluate.add_argument(
        "--through-service", action="store_true", help="send the test cases as files through the service's path"
    )
    evaluate.add_argument(
        "--aspect", action="store_true", help="non-square crops of the test cases, stretched vs letterboxed"
    )
    evaluate.add_argument(
        "--limit", type=int, help="with --through-service or --aspect: at most this many cases per dataset"
    )
    evaluate.add_argument("--json", required=True, help="where to write the results")
    evaluate.add_argument("--report", help="folder for report.md, reliability.png and gallery.png")
    evaluate.add_argument("--batch", type=int, default=8)
    evaluate.set_defaults(func=cmd_evaluate)

    ship = commands.add_parser("ship", help="store a trained checkpoint as the package's weights, with its card")
    ship.add_argument("--checkpoint", required=True, help="a training checkpoint (.safetensors + .json)")
    ship.add_argument("--eval", help="the JSON written by c2p evaluate for this checkpoint")
    ship.add_argument(
        "--graph-only", action="store_true",
        help="only (re)make the stripped ONNX graph beside already shipped weights (--checkpoint NAME.safetensors)",
    )  # fmt: skip
    ship.add_argument("--provenance", help="JSON file: command, data, hardware, other measurements")
    ship.add_argument("--out", type=Path, help="folder (default: models/weights inside the package)")
    ship.set_defaults(func=cmd_ship)

    keys = commands.add_parser("keys", help="API keys: make one for a tenant (the key, and the digest to store)")
    key_commands = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = key_commands.add_parser("new", help="print a new key and its C2P_API_KEYS entry (TENANT:sha256:HEX)")
    new.add_argument("--tenant", required=True, help="who the key's jobs belong to")
    new.set_defaults(func=cmd_keys_new)

    data = commands.add_parser("data", help="make datasets: the synthetic universal benchmark, MNI white matter")
    kinds = data.add_subparsers(dest="kind", required=True, metavar="KIND")
    synth = kinds.add_parser("synth", help="the universal benchmark (8 training tasks, zero-shot tasks)")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--train", type=int, default=300, help="training images per task")
    synth.add_argument("--test", type=int, default=60, help="test images per task")
    synth.add_argument("--size", type=int, default=256)
    synth.add_argument("--workers", type=int, default=1)
    synth.set_defaults(func=cmd_data_synth)
    foreign = kinds.add_parser("foreign", help="evaluation only: another generator's data (never trained on)")
    foreign.add_argument("--out", type=Path, required=True)
    foreign.add_argument("--seed", type=int, default=1000)
    foreign.add_argument("--test", type=int, default=60, help="cases per family")
    foreign.add_argument("--size", type=int, default=256)
    foreign.set_defaults(func=cmd_data_foreign)
    mni = kinds.add_parser("mni-wm", help="white matter on the MNI152 T1 (real anatomy, one target)")
    mni.add_argument("--out", type=Path, required=True)
    mni.add_argument("--size", type=int, default=256)
    mni.add_argument("--seed", type=int, default=0)
    mni.set_defaults(func=cmd_data_mni_wm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from service.errors import ServiceError, WorkerFailed

    try:
        return int(args.func(args))
    except (ServiceError, ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    except WorkerFailed as err:  # its supervisor starts a fresh process
        log.error("%s", err)
        return 3


if __name__ == "__main__":
    sys.exit(main())
