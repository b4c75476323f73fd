"""`moleflow` command line.

Every user-caused problem (bad config key, missing dataset, not a model directory, …) ends with a one-line
error that says how to fix it and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
from datetime import datetime
from collections.abc import Iterator
from pathlib import Path

COMMANDS = {
    "fit": "train a scenario task by task and evaluate every seen task after each one",
    "add-task": "learn one new task on a saved model from the new images only",
    "evaluate": "evaluate a saved model on its tasks' test sets",
    "predict": "score new images: routed task, image score, anomalous or not, anomaly-map PNGs",
    "demo": "learn two real solar-cell tasks (ELPV mono, then poly) on CPU and show the results",
    "grid": "run an experiment grid (--vary key=v1,v2 --seeds 0,1), resumable",
    "report": "compare run directories in grouped Markdown tables",
    "analyze": "analyses of trained runs (tail: the tail-aware loss analysis suite)",
    "export": "the model as ONNX files (backbone + one scoring chain per task) that score as PyTorch does",
    "serve": "an HTTP inspection service with a browser page (POST /predict, GET /tasks, /health, /docs)",
    "threshold": "set a task's decision threshold (a value, or a false-alarm rate on its held-out good images)",
    "verify": "check every file of a model (and of its export) against the digests written with it",
}


RAY_HELP = ("learn every task after the first as its own Ray task: local (default: a cluster on this machine), "
            "auto (the cluster this machine belongs to) or a cluster address; needs pip install 'moleflow[ray]'")


@contextlib.contextmanager
def _removed_if_failed(out: Path) -> Iterator[None]:
    """A run directory this command creates is removed again when the command fails before a model was
    saved in it: nothing half-written is left behind (a run that saved tasks stays, for --resume)."""
    existed = Path(out).exists()
    try:
        yield
    except BaseException:
        model = Path(out) / "model"
        if not existed and not (model / "manifest.json").exists() and not (model / "pending.json").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _default_run_dir(stem: str) -> Path:
    return Path("runs") / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# long function: one declarative table of every command's arguments reads better than eight fragments
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moleflow",
        description="Continual anomaly detection on industrial images (MoLE-Flow).",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the result lines")
    # --quiet is accepted after the command too; SUPPRESS keeps a subcommand from resetting it to False.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars, only the result lines")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    f = sub.add_parser("fit", help=COMMANDS["fit"], parents=[common])
    f.add_argument("config", help="experiment YAML (e.g. configs/mvtec_main.yaml)")
    f.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 train.epochs=5")
    f.add_argument("--out", type=Path, help="run directory (default runs/<config>-<time>)")
    f.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None, help="write PNG plots and report.html (default on)")
    f.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last completed task")
    f.add_argument("--skip-bad", action="store_true", help="leave out unreadable images (listed in results.json) instead of stopping")
    f.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help=RAY_HELP)

    a = sub.add_parser("add-task", help=COMMANDS["add-task"], parents=[common])
    a.add_argument("model_dir", type=Path)
    a.add_argument("--dataset", required=True, help="mvtec | mpdd | visa | elpv | folder")
    a.add_argument("--root", help="dataset root (the folder holding the class folders); not needed for elpv")
    a.add_argument("--classes", nargs="+", required=True,
                   help="the new task's classes (`--classes a b`: one task of two classes); commas separate tasks "
                        "(`--classes a,b,c`: three new tasks)")
    a.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help=RAY_HELP)
    a.add_argument("--out", type=Path, help="run directory for results (default: the model's own run directory)")

    e = sub.add_parser("evaluate", help=COMMANDS["evaluate"], parents=[common])
    e.add_argument("model_dir", type=Path)
    e.add_argument("config", nargs="?", help="YAML whose data section says where the test data lies (default: the model's)")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--out", type=Path)

    pr = sub.add_parser("predict", help=COMMANDS["predict"], parents=[common])
    pr.add_argument("model_dir", type=Path)
    pr.add_argument("paths", nargs="+", type=Path, help="image files or folders of images")
    pr.add_argument("--out", type=Path, required=True, help="folder for predictions.jsonl and the PNG maps")
    pr.add_argument("--runtime", choices=["torch", "onnx", "openvino"], default="torch",
                    help="score with PyTorch, or the ONNX export on ONNX Runtime or OpenVINO")
    pr.add_argument("--export", type=Path, help="the folder `moleflow export` wrote (for --runtime onnx)")
    pr.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                    help="score on a Ray cluster with Ray Data (actors that load the model once): local (default), auto or an address")
    pr.add_argument("--skip-bad", action="store_true",
                    help="leave out unreadable or truncated images (listed in skipped.jsonl) instead of stopping")

    th = sub.add_parser("threshold", help=COMMANDS["threshold"], parents=[common])
    th.add_argument("model_dir", type=Path)
    th.add_argument("--task", required=True, help="the task's index or one of its class names")
    how = th.add_mutually_exclusive_group(required=True)
    how.add_argument("--value", type=float, help="the new image-score threshold")
    how.add_argument("--false-alarm-rate", type=float, metavar="R",
                     help="the threshold that calls a share R of the task's held-out good images defective (e.g. 0.01)")

    ve = sub.add_parser("verify", help=COMMANDS["verify"], parents=[common])
    ve.add_argument("model_dir", type=Path)
    ve.add_argument("--export", type=Path, help="also check this export folder is the model's and its files intact")
    ve.add_argument("--seal", action="store_true", help="add a digest to a manifest written before manifests had one")

    ex = sub.add_parser("export", help=COMMANDS["export"], parents=[common])
    ex.add_argument("model_dir", type=Path)
    ex.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                    help="onnx: ONNX files (ONNX Runtime, or OpenVINO reading them); openvino: also OpenVINO IR (.xml/.bin)")
    ex.add_argument("--out", type=Path, required=True, help="folder for the exported files (run again after add-task)")

    d = sub.add_parser("demo", help=COMMANDS["demo"], parents=[common])
    d.add_argument("--out", type=Path, help="run directory (default runs/demo-<time>)")
    d.add_argument("--add", type=Path, help="an MVTec-layout class folder (e.g. ../shared/data/mvtec_ad/bottle) to add as a third task")
    d.add_argument("overrides", nargs="*", help="dotted overrides of the demo config")

    g = sub.add_parser("grid", help=COMMANDS["grid"], parents=[common])
    g.add_argument("config")
    g.add_argument("overrides", nargs="*", help="dotted overrides applied to every run, e.g. data.root=...")
    g.add_argument("--vary", action="append", default=[], help="key=v1,v2 (repeatable)")
    g.add_argument("--seeds", default="", help="comma-separated seeds, e.g. 0,1,2")
    g.add_argument("--out", type=Path, default=Path("runs/grid"))

    r = sub.add_parser("report", help=COMMANDS["report"], parents=[common])
    r.add_argument("run_dirs", nargs="+", type=Path)
    r.add_argument("--group-by", default="", help="comma-separated config keys, e.g. train.lr,loss.lambda_logdet")
    r.add_argument("--baseline", default="", help="run name to compute deltas against")

    an = sub.add_parser("analyze", help=COMMANDS["analyze"], parents=[common])
    an.add_argument("kind", choices=["tail"])
    an.add_argument("run_mean_only", type=Path)
    an.add_argument("run_tail_aware", type=Path)
    an.add_argument("--out", type=Path, help="folder for analysis.md and the PNGs (default runs/analysis-<time>)")
    an.add_argument("--task", type=int, default=0, help="which task of the runs to analyse")
    an.add_argument("--max-images", type=int, default=64, help="images per split used for the measurements")
    an.add_argument("--sweep", nargs="*", type=Path, default=[], help="runs differing in loss.tail_ratio, for measurement 7")
    sv = sub.add_parser("serve", help=COMMANDS["serve"], parents=[common])
    sv.add_argument("model_dir", type=Path)
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default %(default)s: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted image file (default %(default)s MB)")
    sv.add_argument("--max-batch", type=int, default=16, help="images scored together across requests (default %(default)s)")
    sv.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a request waits for others to batch with")
    sv.add_argument("--token-file", type=Path, help="file holding the bearer token (default: $MOLEFLOW_API_TOKEN; none: no auth)")
    sv.add_argument("--no-auth", action="store_true", help="serve a non-loopback --host without a token, on purpose")
    sv.add_argument("--max-pixels", type=float, default=40e6, help="largest image (width x height, from its header, before decoding; default 40e6)")
    sv.add_argument("--max-request-mb", type=float, help="largest request body (default: 64 files x --max-upload-mb)")
    sv.add_argument("--max-uploads-in-flight", type=int, default=32, help="uploads received or scored at once; more get 503 (default %(default)s)")
    sv.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's line and headers (default %(default)s)")
    sv.add_argument("--body-timeout", type=float, default=30.0, help="longest silence in a request body, in seconds (default %(default)s)")
    sv.add_argument("--keep-alive-timeout", type=float, default=5.0, help="idle seconds before a kept-alive connection closes")
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from moleflow.features.weights import BackboneError
    from moleflow.model.checkpoint import CheckpointError
    from moleflow.config import ConfigError
    from moleflow.data import DatasetError
    from moleflow.features.cache import FeatureError
    from moleflow.scoring import ScoreError
    from moleflow.continual.train import TrainingError

    return (ConfigError, DatasetError, CheckpointError, BackboneError, TrainingError, FeatureError, ScoreError,
            FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while waiting make torch ~100x slower when another process shares the
    # cores (measured on 2 cores); passive waiting costs little when alone. Must precede importing torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = _parser()
    # Overrides may also come after options (`fit cfg.yaml --out r train.lr=1e-4`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        _parser().print_help()
        return 0
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    errors = _user_errors()
    try:
        return _run(args)
    except errors as exc:
        print(f"moleflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moleflow {args.command}: interrupted; completed tasks are saved in the model directory", file=sys.stderr)
        return 130


def _fit(args: argparse.Namespace, progress: bool) -> int:
    from moleflow.config import ConfigError, load_config
    from moleflow.continual.jobs import run_fit, run_fit_parallel

    flags = [] if args.plots is None else [f"output.plots={'true' if args.plots else 'false'}"]
    flags += ["data.skip_bad=true"] if args.skip_bad else []
    cfg = load_config(args.config, [*args.overrides, *flags])  # the flags are overrides like any other
    if args.resume and not args.out:
        raise ConfigError("--resume needs --out: the run directory to continue")
    out = args.out or _default_run_dir(Path(args.config).stem)
    t0 = time.perf_counter()
    with _removed_if_failed(out):
        if args.ray:
            results = run_fit_parallel(cfg, out, args.ray, progress=progress, resume=args.resume)
        else:
            results = run_fit(cfg, out, progress=progress, resume=args.resume)
    _print_summary(results, out, time.perf_counter() - t0)
    return 0


def _add_task(args: argparse.Namespace, progress: bool) -> int:
    from moleflow.config import ConfigError
    from moleflow.continual.jobs import run_add_task
    from moleflow.data import parse_class_spec

    tasks = [[c if ":" in c else f"{args.dataset}:{c}" for c in group.split()] for group in " ".join(args.classes).split(",")]
    if any(not specs for specs in tasks):
        raise ConfigError(f"--classes {' '.join(args.classes)}: an empty task between commas")
    for s in sum(tasks, []):
        parse_class_spec(s, args.dataset)
    roots = {args.dataset: args.root} if args.root else {}
    t0 = time.perf_counter()
    results = run_add_task(args.model_dir, tasks, roots, args.out, progress=progress, ray=args.ray)
    _print_summary(results, args.out or args.model_dir.parent, time.perf_counter() - t0)
    return 0


def _evaluate(args: argparse.Namespace, progress: bool) -> int:
    from moleflow.config import load_config
    from moleflow.continual.jobs import run_evaluate

    cfg = load_config(args.config, args.overrides) if args.config else None
    out = args.out or _default_run_dir("evaluate")
    with _removed_if_failed(out):
        results = run_evaluate(args.model_dir, cfg, out, progress=progress)
    _print_summary(results, out, None)
    return 0


def _predict(args: argparse.Namespace, progress: bool) -> int:
    from moleflow.predict import run_predict

    n, skipped = run_predict(args.model_dir, args.paths, args.out, progress=progress, runtime=args.runtime,
                             export_dir=args.export, ray=args.ray, skip_bad=args.skip_bad)
    print(f"{n} predictions written to {args.out / 'predictions.jsonl'}")
    if skipped:
        print(f"{len(skipped)} unreadable file(s) left out, listed in {args.out / 'skipped.jsonl'}")
    return 0


def _export(args: argparse.Namespace, progress: bool) -> int:
    from moleflow.continual.system import load_system
    from moleflow.export import export_onnx

    manifest = export_onnx(load_system(args.model_dir), args.model_dir, args.out, args.format)
    print(f"{len(manifest['tasks'])} task(s) and the backbone exported to {args.out}")
    return 0


def _demo(args: argparse.Namespace, progress: bool) -> int:
    from moleflow.demo import run_demo

    return run_demo(args.out or _default_run_dir("demo"), args.add, args.overrides, progress=progress)


def _grid(args: argparse.Namespace, progress: bool) -> int:
    from moleflow.research.grid import parse_seeds, run_grid

    run_grid(Path(args.config), args.vary, parse_seeds(args.seeds), args.out, progress=progress, overrides=args.overrides)
    return 0


def _report(args: argparse.Namespace, progress: bool) -> int:
    from moleflow.config import ConfigError
    from moleflow.research.compare import collect_runs, compare_runs

    runs, skipped = collect_runs(args.run_dirs)
    if not runs:
        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped)
        raise ConfigError(f"no finished run among the folders given ({reasons}); give run folders written by "
                          "`moleflow fit --out` or `moleflow grid --out`")
    print(compare_runs(args.run_dirs, [k.strip() for k in args.group_by.split(",") if k.strip()], args.baseline or None))
    return 0


def _analyze(args: argparse.Namespace, progress: bool) -> int:
    from moleflow.research.analysis import analyze_tail

    out = args.out or _default_run_dir("analysis")
    with _removed_if_failed(out):
        path = analyze_tail(args.run_mean_only, args.run_tail_aware, out, task=args.task, sweep=list(args.sweep),
                            max_images=args.max_images, progress=progress)
    print(f"analysis written to {path}")
    return 0


def _serve(args: argparse.Namespace, progress: bool) -> int:
    import uvicorn

    from moleflow.service.app import ServiceConfig, create_app
    from moleflow.service.auth import auth_lines, read_token
    from moleflow.service.server import uvicorn_config

    token, source = read_token(args.token_file)
    lines = auth_lines(args.host, token, source, args.no_auth)  # refuses before the model is loaded
    mb = 1024 * 1024
    cfg = ServiceConfig(args.model_dir, max_upload_bytes=int(args.max_upload_mb * mb), max_batch=args.max_batch,
                        batch_wait_s=args.batch_wait_ms / 1000.0, max_pixels=int(args.max_pixels), token=token,
                        max_request_bytes=None if args.max_request_mb is None else int(args.max_request_mb * mb),
                        max_uploads_in_flight=args.max_uploads_in_flight, header_timeout_s=args.header_timeout,
                        body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive_timeout)
    app = create_app(cfg)  # loads the model first: a bad model directory is a one-line error, not a server
    for line in lines:
        print(line, file=sys.stderr if line.startswith("warning") else sys.stdout)
    print(f"serving {args.model_dir} on http://{args.host}:{args.port}/ (docs at /docs); Ctrl-C stops", flush=True)
    uvicorn.Server(uvicorn_config(app, cfg, args.host, args.port, "warning" if args.quiet else "info")).run()
    return 0


def _threshold(args: argparse.Namespace, progress: bool) -> int:
    from moleflow.model.manifest import TaskRecord, find_task, read_verified, set_threshold, threshold_for_rate

    manifest = read_verified(args.model_dir)
    index = find_task(manifest, args.task)
    if args.value is not None:
        value, how = args.value, "set by value"
    else:
        record = TaskRecord.from_entry(manifest["tasks"][index])
        value = threshold_for_rate(record, args.false_alarm_rate)
        how = f"false-alarm rate {args.false_alarm_rate:g} on {len(record.calibration)} held-out good images"
    old, _ = set_threshold(args.model_dir, index, value, how)
    print(f"task {index} ({'+'.join(manifest['tasks'][index]['classes'])}): threshold {old:.6g} -> {value:.6g} ({how})")
    return 0


def _verify(args: argparse.Namespace, progress: bool) -> int:
    from moleflow.verify import verify

    checks = verify(args.model_dir, args.export, args.seal)
    for c in checks:
        print(c.line())
    failed = sum(not c.ok for c in checks)
    print(f"verify: {failed} of {len(checks)} checks failed" if failed else f"verify: all {len(checks)} checks passed")
    return 2 if failed else 0


HANDLERS = {"fit": _fit, "add-task": _add_task, "evaluate": _evaluate, "predict": _predict, "demo": _demo,
            "grid": _grid, "report": _report, "analyze": _analyze, "serve": _serve, "export": _export,
            "threshold": _threshold, "verify": _verify}


def _run(args: argparse.Namespace) -> int:
    return HANDLERS[args.command](args, not args.quiet)  # argparse only lets known commands through


def _print_summary(results, run_dir: Path, seconds: float | None) -> None:
    from moleflow.results.tables import decision_table, markdown_table, step_table

    print()
    print(step_table(results))
    decisions = decision_table(results)
    if decisions is not None:
        print(f"\nDecisions at the shipped thresholds (routing on)\n\n{markdown_table(decisions)}")
    if seconds is not None:
        print(f"\ntook {seconds:.0f} s")
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    sys.exit(main())
