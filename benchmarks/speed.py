"""Speed and size of moleflow on this machine, all measured in one run (issue 6).

    python benchmarks/speed.py [--json] [--epochs N] [--images N] [--repeats R] [--category PATH] [--variants G,..]

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
- params_shared / params_per_task, peak_rss_mb (ru_maxrss of this process; peak_rss_mb_torch the same
                      before the other runtimes were set up);
- runtimes_img_s      predict at 1 and T tasks on each runtime side by side (issue 15): PyTorch f32 (the
                      reference), torch-compile (inductor with freezing: backbone + each task's chain with
                      its LoRA merged), torch-bf16-backbone / torch-bf16 (torch.autocast bfloat16 over the
                      backbone / backbone and chain), the f32 ONNX export on ONNX Runtime ("onnx") and
                      OpenVINO ("openvino"), openvino-bf16 (INFERENCE_PRECISION_HINT bf16), onnx-int8-backbone /
                      -chain / onnx-int8 (onnxruntime.quantization: static QDQ backbone calibrated on 32
                      training images, dynamic int8 MatMuls in the chains), openvino-int8-backbone /
                      openvino-int8 (NNCF post-training int8; needs the package nncf). runtimes_setup_s is each
                      variant's build + first call (compilation, quantization; not in img/s), runtimes_parity
                      its agreement with PyTorch f32 on the same images (see PARITY_*). --variants picks groups.

All rates are timed interleaved (one call of each per round, after a warm-up), so a slow phase of
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
import contextlib
import copy
import dataclasses
import hashlib
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
from moleflow.router import UNKNOWN
from moleflow.scoring import anomaly_map, image_score, routed_patch_scores
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
    routing, flow (with patch scores: the patch memory's distance too, in the blend), map (upsampling +
    blur) and image score. Shows where the time of the predict path goes; the stages are timed one by
    one, so they add up to about its total."""
    cfg, size = system.cfg, system.cfg.data.image_size
    times: dict[str, list[float]] = {k: [] for k in ("features", "routing", "flow", "map", "image_score")}
    for _ in range(repeats):
        t0 = time.perf_counter()
        patches, desc = system.extractor(images.to(system.device))
        t1 = time.perf_counter()
        routed = system.router.route(desc.cpu())
        t2 = time.perf_counter()
        # Images routed to "unknown" (router.unknown) are scored under task 0 here: timing only.
        s = routed_patch_scores(system.model, patches, routed.clamp(min=0), cfg.scoring)  # flow (+ memory)
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


# --------------------------------------------------------------------------- runtime variants (issue 15)

# Groups of variants beside PyTorch f32 and the f32 exports (--variants; the default runs them all).
VARIANT_GROUPS = ("compile", "bf16", "int8", "openvino-int8")
# Issue 15's parity: image scores within 1e-4 relative of PyTorch f32, verdicts and routed task
# identical, maps within 1e-3. Float32 maps reach values in the thousands, where even the f32 ONNX
# export misses 1e-3 absolute, so a map is judged relative to its own scale (max |map|); both reported.
PARITY_SCORE_REL = 1e-4
PARITY_MAP_ABS = 1e-3
PARITY_MAP_REL = 1e-3
CALIBRATION_IMAGES = 32  # int8: training images of the category (never the timed test images)


def _numpy_out(outputs: tuple[torch.Tensor, ...]) -> list:
    return [t.detach().float().cpu().numpy() for t in outputs]


def torch_session(module: torch.nn.Module, key: str, bf16: bool = False) -> Callable[[dict], list]:
    """A torch module as a ChainScorer function (feeds -> NumPy outputs), under bf16 autocast if asked."""
    def run(feeds: dict) -> list:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return _numpy_out(module(torch.from_numpy(feeds[key])))
    return run


def merged_model(model: torch.nn.Module, task: int) -> torch.nn.Module:
    """A copy of the model whose LoRA layers are plain nn.Linear with task `task`'s merged weights (the
    same numbers as the LoRA merge cache): torch.compile then sees one graph without the cache's
    Python bookkeeping, which it cannot trace (data pointers, tensor versions)."""
    from moleflow.model.lora import LoRALinear

    out = copy.deepcopy(model)
    with torch.no_grad(), out.use_task(task):
        for name, layer in list(out.named_modules()):
            if isinstance(layer, LoRALinear):
                w, b = layer.effective_weight_and_bias()
                linear = torch.nn.Linear(layer.in_features, layer.out_features).to(w)
                linear.weight.copy_(w)
                linear.bias.copy_(b)
                parent, _, leaf = name.rpartition(".")
                setattr(out.get_submodule(parent), leaf, linear)
    return out


def torch_chains(system: System, merged: bool = False) -> dict[int, torch.nn.Module]:
    """One scoring chain per task (export.TaskChain, what the ONNX files hold), eager or LoRA-merged."""
    from moleflow.export import TaskChain

    size = system.cfg.data.image_size
    return {r.index: TaskChain(merged_model(system.model, r.index) if merged else system.model, r.index,
                               system.cfg.scoring, size).eval() for r in system.tasks}


def compile_scorers(systems: dict[int, System]) -> dict[int, object]:
    """torch.compile (inductor, freezing: weights folded as constants, the CPU inference setting) of the
    backbone and of each task's LoRA-merged scoring chain; compilation happens at the first call."""
    import torch._dynamo
    import torch._inductor.config

    from moleflow.export import ChainScorer

    torch._inductor.config.freezing = True
    torch._dynamo.config.recompile_limit = 256  # one graph per task chain (and batch size)
    torch._dynamo.config.cache_size_limit = 256
    first = next(iter(systems.values()))
    backbone = torch_session(torch.compile(first.extractor.eval()), "images")  # shared by the systems
    return {n: ChainScorer(backbone, {t: torch_session(torch.compile(c), "patches") for t, c in torch_chains(s, True).items()},
                           s.router, s.cfg.data.image_size) for n, s in systems.items()}


def bf16_scorers(systems: dict[int, System], chain_too: bool) -> dict[int, object]:
    """PyTorch under torch.autocast("cpu", bfloat16): the backbone, and with `chain_too` the flow chain."""
    from moleflow.export import ChainScorer

    return {n: ChainScorer(torch_session(s.extractor.eval(), "images", True),
                           {t: torch_session(c, "patches", chain_too) for t, c in torch_chains(s).items()},
                           s.router, s.cfg.data.image_size) for n, s in systems.items()}


def openvino_session(model: object, precision: str = "f32") -> Callable[[dict], list]:
    """An ONNX file or an openvino.Model compiled for the CPU at INFERENCE_PRECISION_HINT `precision`."""
    import numpy as np
    import openvino as ov

    compiled = ov.Core().compile_model(str(model) if isinstance(model, Path) else model, "CPU",
                                       {"INFERENCE_PRECISION_HINT": precision})
    return lambda feeds: [np.asarray(v) for v in compiled(feeds).values()]


def _onnx_manifest(folder: Path) -> dict:
    return json.loads((folder / "export.json").read_text())


def folder_sessions(folder: Path) -> tuple[Callable, dict[int, Callable]]:
    """The ONNX Runtime sessions of an export folder's files as they are (the int8 copies are not the
    exported files, so OnnxScorer's digest check would refuse them, as it should)."""
    from moleflow.export import runtime_session

    manifest = _onnx_manifest(folder)
    return (runtime_session(folder / manifest["backbone"]["file"], "onnx"),
            {e["index"]: runtime_session(folder / e["file"], "onnx") for e in manifest["tasks"]})


def onnx_int8_folder(src: Path, dst: Path, calib_images: torch.Tensor | None, chains: bool, cache: dict) -> Path:
    """A copy of the export `src` in `dst` with onnxruntime.quantization int8 files: the backbone static
    when `calib_images` are given (QDQ, per-channel int8 weights, uint8 activations calibrated on them,
    of Conv and MatMul), the task chains dynamic (int8 MatMul weights, activations quantized per call)
    with `chains`; the other files stay f32. `cache` keeps each quantized file by its source's content."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({"images": calib_images[i : i + 8].numpy()} for i in range(0, len(calib_images), 8))

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    dst.mkdir(parents=True)
    (dst / "export.json").write_text((src / "export.json").read_text())
    manifest = _onnx_manifest(src)
    for file, quantize in [(manifest["backbone"]["file"], calib_images is not None), *[(e["file"], chains) for e in manifest["tasks"]]]:
        data = (src / file).read_bytes()
        if not quantize:
            (dst / file).write_bytes(data)
            continue
        key = (file == manifest["backbone"]["file"], hashlib.sha256(data).hexdigest())
        if key not in cache:
            out = dst.parent / f"int8_{key[1][:16]}_{file}"
            if key[0]:
                # Conv and MatMul only: quantizing the float arithmetic on shapes (the resize of the deeper
                # layer to the patch grid) would change the grid.
                quantize_static(str(src / file), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=["Conv", "MatMul", "Gemm"])
            else:
                quantize_dynamic(str(src / file), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
            cache[key] = out.read_bytes()
        (dst / file).write_bytes(cache[key])
    return dst


def openvino_int8_sessions(folder: Path, calib_images: torch.Tensor, calib_patches: dict[int, torch.Tensor] | None,
                           cache: dict) -> tuple[Callable, dict[int, Callable]]:
    """NNCF post-training int8 (nncf.quantize, default preset) of the backbone, and of each task chain
    when `calib_patches` (task -> its training patches) are given, on OpenVINO; the rest f32."""
    import nncf
    import openvino as ov

    def quantized(file: str, samples: list[dict]) -> Callable:
        key = hashlib.sha256((folder / file).read_bytes()).hexdigest()
        if key not in cache:
            model = ov.Core().read_model(str(folder / file))
            with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is the table or the JSON
                cache[key] = nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))
        return openvino_session(cache[key])

    manifest = _onnx_manifest(folder)
    backbone = quantized(manifest["backbone"]["file"], [{"images": calib_images[i : i + 1].numpy()} for i in range(len(calib_images))])
    tasks = {}
    for e in manifest["tasks"]:
        if calib_patches is None:
            tasks[e["index"]] = openvino_session(folder / e["file"])
        else:
            p = calib_patches[e["index"]].float()
            tasks[e["index"]] = quantized(e["file"], [{"patches": p[i : i + 1].numpy()} for i in range(len(p))])
    return backbone, tasks


def variant_builders(systems: dict[int, System], folders: dict[int, Path], groups: set[str], tmp: Path,
                     calib_images: torch.Tensor | None, calib_patches: dict[int, torch.Tensor] | None,
                     notes: list[str]) -> dict[str, Callable[[], dict[int, object]]]:
    """name -> a function building that runtime's scorer of each system (tasks -> scorer), for the
    installed runtimes and the asked `groups`; what cannot run here is said in `notes`."""
    import importlib.util

    from moleflow.export import ChainScorer, OnnxScorer

    def has(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    def each(make: Callable[[int, Path], object]) -> Callable[[], dict[int, object]]:
        return lambda: {n: make(n, f) for n, f in folders.items()}

    def chains(n: int, backbone: Callable, tasks: dict[int, Callable]) -> object:
        return ChainScorer(backbone, tasks, systems[n].router, systems[n].cfg.data.image_size)

    out: dict[str, Callable[[], dict[int, object]]] = {}
    if "compile" in groups:
        out["torch-compile"] = lambda: compile_scorers(systems)
    if "bf16" in groups:
        out["torch-bf16-backbone"] = lambda: bf16_scorers(systems, chain_too=False)
        out["torch-bf16"] = lambda: bf16_scorers(systems, chain_too=True)
    if has("onnxruntime"):
        out["onnx"] = each(lambda n, f: OnnxScorer(f, systems[n], "onnx"))
        cache: dict = {}
        for name, bb, ch in (("onnx-int8-backbone", True, False), ("onnx-int8-chain", False, True), ("onnx-int8", True, True)):
            if "int8" in groups:
                out[name] = each(lambda n, f, name=name, bb=bb, ch=ch: chains(n, *folder_sessions(
                    onnx_int8_folder(f, tmp / name / f.name, calib_images if bb else None, ch, cache))))
    elif "int8" in groups:
        notes.append("int8 (onnxruntime.quantization) left out: onnxruntime is not installed")
    if has("openvino"):
        out["openvino"] = each(lambda n, f: OnnxScorer(f, systems[n], "openvino"))
        if "bf16" in groups:
            out["openvino-bf16"] = each(lambda n, f: chains(n, openvino_session(f / "backbone.onnx", "bf16"), {
                e["index"]: openvino_session(f / e["file"], "bf16") for e in _onnx_manifest(f)["tasks"]}))
        if "openvino-int8" in groups and has("nncf"):
            ov_cache: dict = {}
            out["openvino-int8-backbone"] = each(lambda n, f: chains(n, *openvino_int8_sessions(f, calib_images, None, ov_cache)))
            out["openvino-int8"] = each(lambda n, f: chains(n, *openvino_int8_sessions(f, calib_images, calib_patches, ov_cache)))
        elif "openvino-int8" in groups:
            notes.append("OpenVINO int8 left out: it needs the package nncf (pip install nncf)")
    return out


def runtime_variants(builders: dict[str, Callable[[], dict[int, object]]], batch: torch.Tensor,
                     notes: list[str]) -> tuple[dict[tuple[str, int], object], dict[str, float]]:
    """Build every variant and call each scorer once on `batch`: (name, tasks) -> scorer, and name ->
    setup seconds (building: compiling, quantizing, loading; plus that first call, where torch.compile
    compiles). A variant that fails to build is left out with a note (the others still run)."""
    scorers: dict[tuple[str, int], object] = {}
    setup: dict[str, float] = {}
    for name, build in builders.items():
        log(f"setting up {name} ...")
        start = time.perf_counter()
        try:
            built = build()
            for sc in built.values():
                sc.score_images(batch)
        except Exception as exc:  # noqa: BLE001 - an optional variant: report it and go on
            notes.append(f"{name} left out: it failed to set up ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
            continue
        setup[name] = time.perf_counter() - start
        scorers.update({(name, n): sc for n, sc in built.items()})
    return scorers, setup


def parity_part(ref, got, thresholds: dict[int, float]) -> dict:
    """One batch of a variant against PyTorch f32: counts of identical routes and verdicts, and the
    largest image-score relative error and map errors over the images routed alike."""
    tasks_same = ref.tasks == got.tasks

    def verdicts(sc) -> list:
        return [None if t == UNKNOWN else bool(v > thresholds[t]) for t, v in zip(sc.tasks.tolist(), sc.image.tolist())]

    k = (tasks_same & (ref.tasks != UNKNOWN)).nonzero().squeeze(1)
    part = {"images": len(ref.tasks), "tasks_same": int(tasks_same.sum()),
            "verdicts_same": sum(a == b for a, b in zip(verdicts(ref), verdicts(got))),
            "score_rel_max": 0.0, "map_abs_max": 0.0, "map_rel_max": 0.0}
    if len(k):
        part["score_rel_max"] = float(((got.image[k] - ref.image[k]).abs() / ref.image[k].abs().clamp_min(1e-12)).max())
        diff = (got.maps[k] - ref.maps[k]).abs().flatten(1).amax(1)
        scale = ref.maps[k].abs().flatten(1).amax(1).clamp_min(1e-12)
        part["map_abs_max"], part["map_rel_max"] = float(diff.max()), float((diff / scale).max())
    return part


def merge_parity(parts: list[dict]) -> dict:
    """The parts of one variant together, and whether it keeps issue 15's parity."""
    out = {key: sum(p[key] for p in parts) for key in ("images", "tasks_same", "verdicts_same")}
    out.update({key: max(p[key] for p in parts) for key in ("score_rel_max", "map_abs_max", "map_rel_max")})
    out["map_abs_ok"] = out["map_abs_max"] <= PARITY_MAP_ABS
    out["keeps_parity"] = (out["tasks_same"] == out["images"] and out["verdicts_same"] == out["images"]
                           and out["score_rel_max"] <= PARITY_SCORE_REL and out["map_rel_max"] <= PARITY_MAP_REL)
    return out


def variant_parity(scorers: dict[tuple[str, int], object], systems: dict[int, System], batches: dict[int, list[torch.Tensor]]) -> dict[str, dict]:
    """name -> parity against PyTorch f32 (each system's own Scorer) over `batches` (tasks -> batches)."""
    refs = {n: [systems[n].scorer.score_images(b) for b in bs] for n, bs in batches.items()}
    parts: dict[str, list[dict]] = {}
    for (name, n), sc in scorers.items():
        thresholds = {r.index: r.threshold for r in systems[n].tasks}
        parts.setdefault(name, []).extend(parity_part(ref, sc.score_images(b), thresholds) for ref, b in zip(refs[n], batches[n]))
    return {name: merge_parity(p) for name, p in parts.items()}


def export_folders(systems: dict[int, System], tmp: Path) -> dict[int, Path]:
    """tasks -> the folder of the ONNX export (`moleflow export`) of that system, when torch.onnx can
    export here (the export-based rows need it); {} otherwise."""
    import importlib.util

    from moleflow.continual.system import save_system
    from moleflow.export import export_onnx

    if importlib.util.find_spec("onnx") is None:
        return {}
    out = {}
    for n, sys_ in systems.items():
        out[n] = tmp / f"T{n}"
        save_system(sys_, tmp / f"model_T{n}")  # an export names the saved model it came from
        export_onnx(sys_, tmp / f"model_T{n}", out[n])
    return out


def category_train_images(category: Path, n: int) -> list[Path]:
    """The first `n` training images of an MVTec-layout class (sorted): calibration data for int8."""
    files = sorted(p for p in (Path(category) / "train").rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    return files[:n]


def setup_runtimes(result: dict, category: Path, systems: dict[int, System], extra_sets: list[tuple[str, FeatureSet]],
                   groups: set[str], batch: torch.Tensor, tmp: Path) -> dict[tuple[str, int], object]:
    """Export the systems (tasks -> system), build every runtime variant of them, call each once:
    (name, tasks) -> scorer. Fills result["export_s"], ["runtimes_setup_s"] and the notes."""
    first = next(iter(systems.values()))
    start = time.perf_counter()
    folders = export_folders(systems, tmp)
    result["export_s"] = time.perf_counter() - start
    calib_images = calib_patches = None
    if groups & {"int8", "openvino-int8"}:
        calib_images = decode(category_train_images(category, CALIBRATION_IMAGES), first.cfg.data.image_size)
        with torch.no_grad():
            calib_patches = {0: first.extractor(calib_images)[0]}
        # The timing tasks are tasks 1, 2, ... in the order of extra_sets: each calibrates on its own images.
        calib_patches.update({i + 1: fs.patches[:CALIBRATION_IMAGES] for i, (_, fs) in enumerate(extra_sets)})
    builders = variant_builders(systems, folders, groups, tmp, calib_images, calib_patches, result["notes"])
    if not folders:
        builders = {k: v for k, v in builders.items() if k.startswith("torch")}
    scorers, result["runtimes_setup_s"] = runtime_variants(builders, batch, result["notes"])
    return scorers


# --------------------------------------------------------------------------- the whole measurement


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
    variants: list[str] | tuple[str, ...] = VARIANT_GROUPS,
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
    # Before the other runtimes hold their sessions and compiled graphs: what PyTorch predict needs.
    result["peak_rss_mb_torch"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    export_tmp = tempfile.TemporaryDirectory()
    scorers = setup_runtimes(result, category, {1: t1_system, n_tasks: system}, extra_sets, set(variants), batch,
                             Path(export_tmp.name))
    for (rt, t), scorer in scorers.items():
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
    for (rt, t) in scorers:
        result["runtimes_img_s"].setdefault(rt, {})[f"T{t}"] = med[f"{rt}_T{t}"]
    log("parity of each runtime against PyTorch f32 ...")
    batches = {1: [batch], n_tasks: [batch] + ([mixed_batch] if mixed_batch is not None else [])}
    result["runtimes_parity"] = variant_parity(scorers, {1: t1_system, n_tasks: system}, batches)
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
        "mixed": mixed_batch is not None, "variants": list(variants),
    }
    return result


def runtimes_table(r: dict) -> list[str]:
    """The runtimes side by side: predict img/s at 1 and T tasks, setup seconds, parity with PyTorch f32."""
    t = r["meta"]["tasks"]
    par = r["runtimes_parity"]
    n_img = next(iter(par.values()))["images"] if par else 0
    lines = ["", f"runtimes side by side: predict img/s (median of the rounds), setup s = build + first call "
             f"(export, quantization, compilation: not in img/s; the export itself {r.get('export_s', 0):.1f} s), "
             f"parity against PyTorch f32 over {n_img} scored images (the batch at 1 and {t} tasks"
             + (", the mixed batch)" if r["meta"].get("mixed") else ")"),
             f"parity = routed task and verdict identical, image score rel <= {PARITY_SCORE_REL:g}, map rel <= "
             f"{PARITY_MAP_REL:g} (map error / max |map|); map abs <= {PARITY_MAP_ABS:g} is shown apart ('abs!' where missed)",
             f"{'runtime':<24} {'1 task':>8} {str(t) + ' tasks':>9} {'setup s':>8} {'score rel':>10} {'routed':>8} "
             f"{'verdicts':>9} {'map abs':>9} {'map rel':>9}  parity",
             "-" * 112]
    for name, rates in r["runtimes_img_s"].items():
        row = f"{name:<24} {rates.get('T1', float('nan')):>8.1f} {rates.get(f'T{t}', float('nan')):>9.1f}"
        if name == "torch":
            lines.append(row + f" {'-':>8} {'(the reference: f32 eager)':>48}")
            continue
        p = par[name]
        lines.append(row + f" {r['runtimes_setup_s'][name]:>8.1f} {p['score_rel_max']:>10.1e} "
                     f"{p['tasks_same']:>3}/{p['images']:<4} {p['verdicts_same']:>4}/{p['images']:<4} {p['map_abs_max']:>9.1e} "
                     f"{p['map_rel_max']:>9.1e}  {'yes' if p['keeps_parity'] else 'NO'}{'' if p['map_abs_ok'] else ' (abs!)'}")
    return lines


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
    lines.append(f"{'peak RSS':<34} {r['peak_rss_mb']:>9.0f} MB  (PyTorch alone, before the other runtimes: "
                 f"{r['peak_rss_mb_torch']:.0f} MB)")
    ro = r["routing"]
    lines.append(f"routing: {t}-task batch on task 0: {ro[f'T{t}_batch_on_task0']:.0%}"
                 + (f"; mixed batch spans {ro[f'T{t}_mixed_distinct_tasks']} tasks" if f"T{t}_mixed_distinct_tasks" in ro else ""))
    lines += runtimes_table(r)
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
    parser.add_argument("--variants", default=",".join(VARIANT_GROUPS),
                        help="runtime variants beside PyTorch f32 and the f32 ONNX Runtime / OpenVINO exports, comma-separated "
                             f"from {', '.join(VARIANT_GROUPS)}, or 'none' (default: all)")
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
    groups = [] if args.variants.strip() == "none" else [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(groups) - set(VARIANT_GROUPS):
        parser.error(f"--variants: unknown {', '.join(sorted(set(groups) - set(VARIANT_GROUPS)))} (choose from {', '.join(VARIANT_GROUPS)})")
    try:
        cfg = benchmark_config(args.category, args.epochs, args.set)
        result = measure(
            cfg, args.category.expanduser().resolve(), images=args.images, warmup=args.warmup, repeats=args.repeats,
            extra_specs=[s.strip() for s in args.extra.split(",") if s.strip()], extra_tasks=args.tasks - 1,
            mixed=not args.no_mixed, variants=groups, progress=args.progress,
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
