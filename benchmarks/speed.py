"""Speed and size of moleflow on this machine, all measured in one run (issue 6).

    python benchmarks/speed.py [--json] [--epochs N] [--images N] [--repeats R] [--category PATH]

Measures, at the default config (moleflow.config.Config(): tf_efficientnet_lite0 with its offline
weights, layers [2, 3], 256 px):

- backbone_img_s      feature extraction only (FeatureExtractor.forward) on a batch of decoded images;
- predict_img_s_T1    end to end on the same batch, as `moleflow predict` computes it minus file
                      reading and PNG writing: features, routing, flow, anomaly map, image score; the
                      model has 1 learned task;
- predict_img_s_T10   the same with 10 learned tasks (the 9 extra tasks are trained briefly, 1 epoch
                      on a few ELPV images each: they exist only for timing);
- train_s_200img      wall-clock of learning one task of 200 images (the category's first 200 training
                      images): decoding + features + training + threshold calibration + router;
- params_shared / params_per_task, peak_rss_mb (ru_maxrss of this process).

The three rates are timed interleaved (one call of each per round, after a warm-up), so a slow phase of
the machine hits all of them alike; the reported figure is the median over the rounds. Status lines
go to stderr; stdout gets the table, or with --json one JSON object. Other jobs on the same cores
distort the figures (OpenMP threads wait for each other): run on an otherwise idle machine.
"""
from __future__ import annotations

import os

# As the moleflow CLI: OpenMP threads wait passively, so the figures are those users get from
# `moleflow fit/predict` (spinning threads slow torch down badly when another process shares the cores).
# Must precede importing torch; set OMP_WAIT_POLICY yourself to measure another policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import dataclasses
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moleflow.features.weights import BackboneError
from moleflow.config import Config, ConfigError, load_config
from moleflow.data import IMAGE_EXTENSIONS, MPDD_CLASSES, MVTEC_CLASSES, DatasetError, ImageDataset, build_dataset, load_image
from moleflow.features.cache import FeatureSet, extract_features
from moleflow.continual.system import System, build_system, learn_new_task, task_features
from moleflow.scoring import anomaly_map, image_score, patch_scores
from moleflow.continual.train import seed_everything

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CATEGORY = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
# Where the extra timing tasks take their images: two products unlike the category, so that the
# category's images keep routing to task 0 (a batch of one product, the usual `predict` case).
DEFAULT_EXTRA_SPECS = ("elpv:mono", "elpv:poly")
TRAIN_IMAGES = 200

# Issue 6's targets.
TARGET_PREDICT_VS_BACKBONE = 0.75
TARGET_T10_VS_T1 = 0.9
TARGET_TRAIN_S = 180.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- config and data


def category_overrides(category: Path) -> list[str]:
    """Dotted config overrides that point the data at an MVTec-layout class folder ROOT/CLASS."""
    category = Path(category).expanduser().resolve()
    if not (category / "train").is_dir():
        raise DatasetError(f"--category {category} is not an MVTec-layout class folder (no train/ inside)")
    name = category.name
    dataset = "mvtec" if name in MVTEC_CLASSES else "mpdd" if name in MPDD_CLASSES else "folder"
    # The folder reader takes ROOT/CLASS/train/good like MVTec's; only the test split differs, and
    # the test images are read here without it (category_test_images).
    return [f"data.dataset={dataset}", f"data.root={category.parent}"]


def benchmark_config(category: Path, epochs: int | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config() defaults, data at `category` limited to 200 training images, then `overrides`."""
    sets = [*category_overrides(category), f"data.max_train_images={TRAIN_IMAGES}"]
    if epochs is not None:
        sets.append(f"train.epochs={epochs}")
    return load_config(None, [*sets, *overrides])


def category_test_images(category: Path, n: int) -> list[Path]:
    """`n` test image files of an MVTec-layout class, spread over its sorted test set (cycled if short)."""
    test_dir = Path(category) / "test"
    files = sorted(p for p in test_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"{test_dir} holds no test images")
    step = max(1, len(files) // n)
    return [files[(i * step) % len(files)] for i in range(n)]


def decode(paths: list[Path], image_size: int) -> torch.Tensor:
    """Decoded images (N, 3, S, S) in [0, 1]: the timed batches start from memory."""
    return torch.stack([load_image(p, image_size) for p in paths])


# --------------------------------------------------------------------------- the predict path


@torch.no_grad()
def predict_batch(system: System, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `moleflow predict` and `Detector.predict` compute for a batch, minus file I/O: the system's
    Scorer without a task id → routed task (B,), image score (B,), anomaly map (B, S, S)."""
    sc = system.scorer.score_images(images)
    return sc.tasks, sc.image, sc.maps



@torch.no_grad()
def predict_stages(system: System, images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Milliseconds per image of each stage of predict_batch (median over `repeats`): features,
    routing, flow (with patch scores), map (upsampling + blur) and image score. Shows where the time
    of the predict path goes; the stages are timed one by one, so they add up to about its total."""
    cfg, size = system.cfg, system.cfg.data.image_size
    times: dict[str, list[float]] = {k: [] for k in ("features", "routing", "flow", "map", "image_score")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        patches, desc = system.extractor(images.to(system.device))
        t1 = time.perf_counter()
        routed = system.router.route(desc.cpu())
        t2 = time.perf_counter()
        # Images routed to "unknown" (router.unknown) are scored under task 0 here: timing only.
        z, log_det = system.model.forward_routed(patches, routed.clamp(min=0).to(system.device))
        s = patch_scores(z, log_det, cfg.scoring.patch_score)
        t3 = time.perf_counter()
        anomaly_map(s, size, cfg.scoring.blur_sigma).cpu()
        t4 = time.perf_counter()
        image_score(s, cfg.scoring.aggregation, cfg.scoring.top_k).cpu()
        t5 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times[key].append(dt)
    return {k: 1000.0 * statistics.median(v) / len(images) for k, v in times.items()}


def interleaved_rates(calls: dict[str, Callable[[], object]], n_images: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Images per second of each call, one call of each per round, the order rotating every round
    (so no call always runs right after the same neighbour); `warmup` untimed calls of each first."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            rates[name].append(n_images / (time.perf_counter() - start))
    return rates


# --------------------------------------------------------------------------- training


@dataclass
class TrainTiming:
    n_images: int
    features_s: float  # decoding + backbone over the training images
    learn_s: float  # learn_task: add the task, fit the flow, calibrate the threshold, fit the router
    fit_s: float  # the flow training alone (part of learn_s)

    @property
    def total_s(self) -> float:
        return self.features_s + self.learn_s


def train_task(system: System, spec: str, progress: bool) -> TrainTiming:
    """Learn `spec` as the next task exactly as `moleflow fit` does, timed (wall-clock)."""
    t0 = time.perf_counter()
    train = task_features(system, [spec], "train", progress)
    t1 = time.perf_counter()
    _, info = learn_new_task(system, [spec], train, progress, step=len(system.tasks))
    t2 = time.perf_counter()
    return TrainTiming(len(train), t1 - t0, t2 - t1, float(info.seconds))


def timing_task_features(system: System, specs: list[str], n_tasks: int, per_task: int) -> list[tuple[str, FeatureSet]]:
    """Training features of `n_tasks` small tasks: consecutive slices of `per_task` training images of
    `specs` in turn (slices wrap around a short training set)."""
    cfg = system.cfg
    sources = {}
    for spec in specs:
        sources[spec] = build_dataset(dataclasses.replace(cfg.data, max_train_images=0), spec, "train")
    out = []
    for i in range(n_tasks):
        spec = specs[i % len(specs)]
        ds = sources[spec]
        k = i // len(specs)
        idx = [(k * per_task + j) % len(ds) for j in range(per_task)]
        sub = ImageDataset([ds.samples[j] for j in idx], ds.image_size, False)
        fs = extract_features(system.extractor, sub, batch_size=cfg.backbone.batch_size, progress=False)
        out.append((f"{spec}#{k}", fs))
    return out


def add_timing_tasks(system: System, sets: list[tuple[str, FeatureSet]], epochs: int) -> None:
    """Learn each set as one more task, `epochs` epochs each (the tasks only exist to be routed over)."""
    saved = system.cfg
    system.cfg = dataclasses.replace(saved, train=dataclasses.replace(saved.train, epochs=epochs))
    try:
        for name, fs in sets:
            learn_new_task(system, [name], fs, progress=False, step=len(system.tasks))
    finally:
        system.cfg = saved


def mixed_images(system: System, category_images: torch.Tensor, specs: list[str], n: int) -> torch.Tensor:
    """A batch of `n` images half from the category, the rest from the test splits of `specs`: a batch
    that routes to several tasks, so the flow runs once per task present (the worst case of routing)."""
    size = system.cfg.data.image_size
    others = []
    for spec in specs:
        ds = build_dataset(system.cfg.data, spec, "test")
        step = max(1, len(ds) // n)
        others.append([ds.samples[(i * step) % len(ds)].path for i in range(n)])
    picks = [category_images[i] for i in range(0, n, 2)]
    j = 0
    while len(picks) < n:
        group = others[j % len(others)]
        picks.append(load_image(group[(j // len(others)) % len(group)], size))
        j += 1
    return torch.stack(picks[:n])


# --------------------------------------------------------------------------- the whole measurement


def exported_runtimes(t1_system: System, system: System, tmp: Path) -> dict[tuple[str, int], object]:
    """(runtime, tasks) -> the scorer of the ONNX export of the 1-task and the T-task system, for each
    installed runtime (ONNX Runtime, OpenVINO): the same predict path as `Detector.load(runtime=...)`."""
    import importlib.util

    from moleflow.export import OnnxScorer, export_onnx

    out: dict[tuple[str, int], object] = {}
    for rt, module in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        if importlib.util.find_spec(module) is None:
            continue
        for sys_, n in ((t1_system, 1), (system, len(system.tasks))):
            folder = tmp / f"T{n}"
            if not (folder / "export.json").is_file():
                export_onnx(sys_, folder, folder)
            out[(rt, n)] = OnnxScorer(folder, sys_.router, rt)
    return out


def measure(
    cfg: Config,
    category: Path,
    *,
    images: int = 16,
    warmup: int = 2,
    repeats: int = 5,
    extra_specs: list[str] | tuple[str, ...] = DEFAULT_EXTRA_SPECS,
    extra_tasks: int = 9,
    extra_images: int = 10,
    extra_epochs: int = 1,
    mixed: bool = True,
    progress: bool = False,
) -> dict:
    """Every figure of this benchmark, from one process; see the module docstring."""
    result: dict = {"notes": []}
    load_start = os.getloadavg()

    # 1. one task of (up to) 200 images at the config's settings, features included
    seed_everything(cfg.train.seed)  # as `moleflow fit`: the shared flow's initialisation
    t0 = time.perf_counter()
    system = build_system(cfg)
    build_s = time.perf_counter() - t0
    spec = Path(category).name
    log(f"training one task on {spec} ({cfg.train.epochs} epochs) ...")
    train = train_task(system, spec, progress)
    if train.n_images < TRAIN_IMAGES:
        result["notes"].append(f"the category has only {train.n_images} training images (< {TRAIN_IMAGES})")
    result["train_s_200img"] = train.total_s
    result["train_breakdown"] = {
        "n_images": train.n_images, "epochs": cfg.train.epochs, "features_s": train.features_s,
        "learn_s": train.learn_s, "fit_s": train.fit_s, "system_build_s": build_s,
    }
    default_epochs = Config().train.epochs
    if cfg.train.epochs != default_epochs:
        # Epochs cost the same each, so the default's fit time is a linear projection.
        result["train_s_200img_projected_default_epochs"] = train.total_s + train.fit_s * (default_epochs / cfg.train.epochs - 1)

    # 2. the one-task system, kept aside (same extractor) before the timing tasks are added
    t1_system = System(cfg, system.device, system.extractor, copy.deepcopy(system.model), copy.deepcopy(system.router),
                       list(system.tasks))
    result["params_shared"] = system.model.shared_parameter_count()

    log(f"decoding {images} test images ...")
    batch = decode(category_test_images(category, images), cfg.data.image_size)  # (N, 3, S, S)

    log(f"adding {extra_tasks} timing tasks ({extra_images} images of {', '.join(extra_specs)}, {extra_epochs} epoch) ...")
    extra_sets = timing_task_features(system, list(extra_specs), extra_tasks, extra_images)
    add_timing_tasks(system, extra_sets, extra_epochs)
    n_tasks = len(system.tasks)
    result["params_per_task"] = system.model.task_parameter_count(n_tasks - 1)

    calls: dict[str, Callable[[], object]] = {
        "backbone": lambda: system.extractor(batch),
        "predict_T1": lambda: predict_batch(t1_system, batch),
        f"predict_T{n_tasks}": lambda: predict_batch(system, batch),
    }
    mixed_batch = None
    if mixed:
        mixed_batch = mixed_images(system, batch, list(extra_specs), images)
        calls[f"predict_T{n_tasks}_mixed"] = lambda: predict_batch(system, mixed_batch)
    export_tmp = tempfile.TemporaryDirectory()
    runtimes = exported_runtimes(t1_system, system, Path(export_tmp.name))
    for (rt, t), scorer in runtimes.items():
        calls[f"{rt}_T{t}"] = (lambda sc: lambda: sc.score_images(batch))(scorer)

    log(f"timing {len(calls)} calls x ({warmup} warm-up + {repeats} rounds), batch {images} ...")
    rates = interleaved_rates(calls, images, warmup, repeats)
    med = {name: statistics.median(r) for name, r in rates.items()}
    result["backbone_img_s"] = med["backbone"]
    result["predict_img_s_T1"] = med["predict_T1"]
    result[f"predict_img_s_T{n_tasks}"] = med[f"predict_T{n_tasks}"]
    if mixed_batch is not None:
        result[f"predict_img_s_T{n_tasks}_mixed"] = med[f"predict_T{n_tasks}_mixed"]
    result["rates_all_rounds"] = rates
    result["runtimes_img_s"] = {"torch": {"T1": med["predict_T1"], f"T{n_tasks}": med[f"predict_T{n_tasks}"]}}
    for (rt, t) in runtimes:
        result["runtimes_img_s"].setdefault(rt, {})[f"T{1 if t == 1 else n_tasks}"] = med[f"{rt}_T{t}"]
    export_tmp.cleanup()
    result["predict_stages_ms_per_img_T1"] = predict_stages(t1_system, batch, repeats)

    # Where the batches went: the single-product batch should stay on task 0 at T10.
    routed_t1, _, _ = predict_batch(t1_system, batch)
    routed_tn, _, _ = predict_batch(system, batch)
    result["routing"] = {
        f"T{n_tasks}_batch_on_task0": float((routed_tn == 0).float().mean()),
        "T1_batch_on_task0": float((routed_t1 == 0).float().mean()),
    }
    if mixed_batch is not None:
        result["routing"][f"T{n_tasks}_mixed_distinct_tasks"] = int(torch.unique(predict_batch(system, mixed_batch)[0]).numel())

    result["ratios"] = {
        "predict_T1_over_backbone": med["predict_T1"] / med["backbone"],
        f"predict_T{n_tasks}_over_T1": med[f"predict_T{n_tasks}"] / med["predict_T1"],
    }
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    result["meta"] = {
        "category": str(category), "images": images, "warmup": warmup, "repeats": repeats, "tasks": n_tasks,
        "epochs": cfg.train.epochs, "epochs_default": default_epochs, "extra_task_epochs": extra_epochs,
        "extra_task_images": extra_images, "extra_specs": list(extra_specs),
        "backbone": f"{cfg.backbone.name} layers {cfg.backbone.layers} ({system.extractor.weights_source})",
        "image_size": cfg.data.image_size, "grid": list(system.extractor.grid), "channels": system.extractor.out_channels,
        "device": str(system.device), "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__,
        "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
        "load_avg_start": list(load_start), "load_avg_end": list(os.getloadavg()),
    }
    return result


def format_table(r: dict) -> str:
    m = r["meta"]
    t = m["tasks"]
    tb = r["train_breakdown"]
    epochs_note = "" if m["epochs"] == m["epochs_default"] else f"  (--epochs {m['epochs']}, NOT the default {m['epochs_default']})"
    lines = [
        f"moleflow speed: {m['backbone']}, {m['image_size']} px, grid {m['grid'][0]}x{m['grid'][1]}, C={m['channels']}, "
        f"{m['device']}, {m['threads']} threads (OMP_WAIT_POLICY {m['omp_wait_policy']}), torch {m['torch']}",
        f"batch {m['images']} images of {m['category']}, {m['warmup']} warm-up + {m['repeats']} interleaved rounds (median); "
        f"load average {m['load_avg_start'][0]:.2f} -> {m['load_avg_end'][0]:.2f}",
        "",
        f"{'measure':<34} {'value':>12}   {'min..max over rounds':<22}",
        "-" * 72,
    ]

    def rate_row(label: str, key: str) -> None:
        rs = r["rates_all_rounds"][key]
        lines.append(f"{label:<34} {statistics.median(rs):>8.1f} img/s  {min(rs):.1f}..{max(rs):.1f}")

    rate_row("backbone (features only)", "backbone")
    rate_row("predict, 1 task", "predict_T1")
    rate_row(f"predict, {t} tasks", f"predict_T{t}")
    for rt in ("onnx", "openvino"):
        if f"{rt}_T1" in r["rates_all_rounds"]:
            rate_row(f"predict, 1 task, {rt} export", f"{rt}_T1")
            rate_row(f"predict, {t} tasks, {rt} export", f"{rt}_T{t}")
    if f"predict_T{t}_mixed" in r["rates_all_rounds"]:
        rate_row(f"predict, {t} tasks, mixed batch", f"predict_T{t}_mixed")
    lines.append(f"{'train one task, ' + str(tb['n_images']) + ' images':<34} {r['train_s_200img']:>10.1f} s{epochs_note}")
    lines.append(f"{'  of which features':<34} {tb['features_s']:>10.1f} s")
    lines.append(f"{'  of which flow training':<34} {tb['fit_s']:>10.1f} s  ({tb['epochs']} epochs)")
    if "train_s_200img_projected_default_epochs" in r:
        lines.append(f"{'  projected to ' + str(m['epochs_default']) + ' epochs':<34} {r['train_s_200img_projected_default_epochs']:>10.1f} s")
    st = r["predict_stages_ms_per_img_T1"]
    lines.append("predict stages, 1 task (ms/img): " + ", ".join(f"{k} {v:.1f}" for k, v in st.items()))
    lines.append(f"{'parameters shared':<34} {r['params_shared']:>12,}")
    lines.append(f"{'parameters per task':<34} {r['params_per_task']:>12,}")
    lines.append(f"{'peak RSS':<34} {r['peak_rss_mb']:>9.0f} MB")
    ro = r["routing"]
    lines.append(f"routing: {t}-task batch on task 0: {ro[f'T{t}_batch_on_task0']:.0%}"
                 + (f"; mixed batch spans {ro[f'T{t}_mixed_distinct_tasks']} tasks" if f"T{t}_mixed_distinct_tasks" in ro else ""))
    lines += ["", "issue 6 targets:"]
    q = r["ratios"]

    def check(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    a, b = q["predict_T1_over_backbone"], q[f"predict_T{t}_over_T1"]
    lines.append(f"  predict_T1 / backbone  = {a:.3f}  (target >= {TARGET_PREDICT_VS_BACKBONE})  {check(a >= TARGET_PREDICT_VS_BACKBONE)}")
    lines.append(f"  predict_T{t} / predict_T1 = {b:.3f}  (target >= {TARGET_T10_VS_T1})  {check(b >= TARGET_T10_VS_T1)}")
    ts = r["train_s_200img"]
    tgt = f"  train_s_200img         = {ts:.1f} s  (target < {TARGET_TRAIN_S:.0f} s)  {check(ts < TARGET_TRAIN_S)}"
    if "train_s_200img_projected_default_epochs" in r:
        p = r["train_s_200img_projected_default_epochs"]
        tgt += f"  [measured at {m['epochs']} epochs; projected to {m['epochs_default']}: {p:.1f} s {check(p < TARGET_TRAIN_S)}]"
    lines.append(tgt)
    for note in r["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs of the 200-image task (default: the config's train.epochs)")
    parser.add_argument("--images", type=int, default=16, help="timing batch size (images per call)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each measurement first")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--category", type=Path, default=DEFAULT_CATEGORY, help="MVTec-layout class folder (default: %(default)s)")
    parser.add_argument("--extra", default=",".join(DEFAULT_EXTRA_SPECS), help="classes the extra timing tasks are cut from")
    parser.add_argument("--tasks", type=int, default=10, help="tasks of the many-task measurement (default 10)")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-batch row")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--progress", action="store_true", help="progress bars (stderr)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default (use that for the figures)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.images < 1 or args.repeats < 1 or args.warmup < 0 or args.tasks < 2:
        parser.error("--images and --repeats must be >= 1, --warmup >= 0, --tasks >= 2")
    try:
        cfg = benchmark_config(args.category, args.epochs, args.set)
        result = measure(
            cfg, args.category.expanduser().resolve(), images=args.images, warmup=args.warmup, repeats=args.repeats,
            extra_specs=[s.strip() for s in args.extra.split(",") if s.strip()], extra_tasks=args.tasks - 1,
            mixed=not args.no_mixed, progress=args.progress,
        )
    except (ConfigError, DatasetError, BackboneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
