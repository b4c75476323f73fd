"""moleflow beside anomalib 2.x PatchCore and CFlow: same backbone weights, same images, same metric code.

    .venv-bench/bin/python benchmarks/peers.py [--category PATH|elpv:CLASS ...] [--epochs N]
                                               [--models patchcore,cflow,moleflow] [--json]

anomalib lives in its own virtualenv so that the main .venv stays clean:

    python3.11 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'

Every model sees the same thing:
- backbone: tf_efficientnet_lite0 with moleflow's offline ImageNet weights (EfficientNet-PyTorch file renamed
  onto timm's modules by moleflow.features.weights), layers [2, 3] (timm out_indices), input normalised with the
  weights' own mean/std; anomalib's TimmFeatureExtractor is built with pre_trained=False and gets these
  weights loaded strictly, so nothing is downloaded;
- images: decoded once (256 px, moleflow's reader), training and test sets in memory, so file reading is in
  no model's time; the first 200 training images of each category by default (--max-train; issue 6's
  task size, and it bounds PatchCore's coreset search);
- one model per category; metrics from moleflow.metrics on the image scores and 256x256 maps each model
  outputs (image AUROC, pixel AUROC, pixel AP, AUPRO at FPR 0.3); ELPV has no masks, so '-' for pixel metrics.

The anomalib torch modules (`PatchcoreModel`, `CflowModel`, i.e. their Lightning modules' `.model`) are
driven by a plain loop instead of anomalib's Engine and data modules (which expect their own dataset
downloads and folder conventions):
- PatchCore (9 neighbours as anomalib; coreset ratio 0.01 by default, the PatchCore paper's "PatchCore-1%",
  because anomalib's 0.1 spends about an hour per 200-image category in the greedy coreset search on a
  2-core CPU; --coreset-ratio 0.1 for anomalib's setting): training = the forward pass in training
  mode over the training images (it stores the patch embeddings) + `subsample_embedding(0.1)`; inference =
  the forward pass in eval mode (anomaly map upsampled and blurred by anomalib, image score as anomalib's).
- CFlow (anomalib defaults: 8 coupling blocks, condition vector 128, fibre batch 64, Adam lr 1e-4): the
  training step of anomalib's Lightning module written as a loop (frozen encoder, per layer random fibre
  batches of 64, loss -logsigmoid(log p / C)); inference = its torch forward per batch, but the maps are
  normalised over the whole test set at once (anomalib's map generator subtracts the maximum over whatever
  it is given, so per-batch maps would depend on the batch composition; the original CFlow code normalises
  over the whole test set too). Image score = the map's maximum, as anomalib.
- moleflow: the default config (`--set KEY=VALUE` to change it) with train.epochs = --epochs; training =
  backbone features of the training images + learn_task (what `moleflow fit` does for one task);
  inference = the `moleflow predict` computation (features, routing, flow, map, image score) per batch.

Times are wall-clock from decoded images: "train s" covers everything a model needs before it can
score (features, coreset / flow training, calibration); "infer img/s" covers scoring the test set.
"""
from __future__ import annotations

import os

# As the moleflow CLI: OpenMP threads wait passively, so the figures are those users get from
# `moleflow fit/predict` (spinning threads slow torch down badly when another process shares the cores).
# Must precede importing torch; set OMP_WAIT_POLICY yourself to measure another policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from moleflow.features.backbone import resolve_device
from moleflow.features.weights import BackboneError, create_classifier
from moleflow.config import Config, ConfigError, load_config
from moleflow.data import DatasetError, ImageDataset, build_dataset
from moleflow.data.mvtec import mvtec_samples
from moleflow.features.cache import FeatureSet
from moleflow.metrics import compute_metrics
from moleflow.continual.system import build_system, learn_new_task
from moleflow.continual.train import seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import predict_batch  # noqa: E402 - the predict computation, shared with speed.py

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CATEGORIES = (str(REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"), "elpv:mono", "elpv:poly")
BACKBONE = "tf_efficientnet_lite0"
LAYERS = [2, 3]
MODELS = ("patchcore", "cflow", "moleflow")
METRIC_COLUMNS = (("image_auroc", "img AUROC"), ("pixel_auroc", "pix AUROC"), ("pixel_ap", "pix AP"), ("aupro", "AUPRO"))
BENCH_HINT = (
    "create the benchmark virtualenv and run this script with it:\n"
    "    python3.11 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]'\n"
    "    .venv-bench/bin/python benchmarks/peers.py"
)


class Unavailable(RuntimeError):
    """A model that cannot run here (anomalib missing or unusable); the message says why."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


@dataclass
class Category:
    name: str
    train: torch.Tensor  # (N, 3, S, S) float in [0, 1]
    test: torch.Tensor  # (M, 3, S, S)
    labels: np.ndarray  # (M,) 0 good / 1 defective
    masks: np.ndarray | None  # (M, S, S) bool, None without pixel ground truth (ELPV)


def _decode_all(ds: ImageDataset) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([it["image"] for it in items])  # (N, 3, S, S)
    labels = np.array([int(it["label"]) for it in items])
    masks = None if items[0]["mask"] is None else torch.stack([it["mask"][0] > 0.5 for it in items]).numpy()  # (N, S, S)
    return images, labels, masks


def load_category(spec: str, image_size: int, max_train: int = 0) -> Category:
    """`spec`: an MVTec-layout class folder (ROOT/CLASS with train/good, test/*, ground_truth/*), or a
    moleflow class spec such as elpv:mono."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path.resolve()
        splits = {s: ImageDataset(mvtec_samples(path.parent, "mvtec", path.name, s), image_size, s == "test") for s in ("train", "test")}
        name = path.name
    elif ":" in spec:
        cfg = load_config(None, [f"data.image_size={image_size}"])
        splits = {s: build_dataset(cfg.data, spec, s) for s in ("train", "test")}
        name = spec
    else:
        raise DatasetError(f"--category {spec}: not a folder and not a class spec like elpv:mono")
    if max_train > 0:
        splits["train"] = ImageDataset(splits["train"].samples[:max_train], image_size, False)
    train, _, _ = _decode_all(splits["train"])
    test, labels, masks = _decode_all(splits["test"])
    return Category(name, train, test, labels, masks)


def batches(x: torch.Tensor, size: int, order: torch.Tensor | None = None):
    idx = torch.arange(len(x)) if order is None else order
    for start in range(0, len(x), size):
        yield x[idx[start : start + size]]


# --------------------------------------------------------------------------- the shared backbone


def offline_backbone_state() -> dict[str, torch.Tensor]:
    """The full tf_efficientnet_lite0 state dict with moleflow's offline weights (no download)."""
    full, source, _ = create_classifier(BACKBONE, "auto")
    if source != "offline-package":
        raise BackboneError(f"expected the offline weights of {BACKBONE}, got '{source}'")
    return full.state_dict()


def load_backbone(features_only_model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Fill a timm features_only model (anomalib's extractor) from the full classifier's state dict:
    its tensors are a subset under the same names, and every one of them must be found."""
    target = features_only_model.state_dict()
    missing = [k for k in target if k not in state or state[k].shape != target[k].shape]
    if missing:
        raise Unavailable(f"anomalib's {BACKBONE} extractor has tensors the offline weights lack: {missing[:5]}")
    features_only_model.load_state_dict({k: state[k] for k in target}, strict=True)


def normalizer(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """(x - mean) / std with the weights' own statistics, as moleflow's FeatureExtractor normalises."""
    import timm

    cfg = timm.models.get_pretrained_cfg(BACKBONE)
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
    return lambda x: (x.to(device) - mean) / std


def import_anomalib() -> dict:
    """anomalib's PatchCore / CFlow torch modules and CFlow helpers, or Unavailable with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # anomalib's import-time deprecation notices about other models
            import anomalib
            from anomalib.models.image.cflow.torch_model import CflowModel
            from anomalib.models.image.cflow.utils import get_logp, positional_encoding_2d
            from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    except ImportError as exc:
        raise Unavailable(f"anomalib cannot be imported in {sys.executable} ({exc}); {BENCH_HINT}") from None
    major = int(anomalib.__version__.split(".")[0])
    if major != 2:
        raise Unavailable(f"anomalib {anomalib.__version__} is installed; this comparison is written for anomalib 2.x")
    return {"version": anomalib.__version__, "PatchcoreModel": PatchcoreModel, "CflowModel": CflowModel,
            "get_logp": get_logp, "positional_encoding_2d": positional_encoding_2d}


# --------------------------------------------------------------------------- the models


@dataclass
class Outcome:
    scores: np.ndarray  # (M,) higher = more anomalous
    maps: np.ndarray  # (M, S, S)
    train_s: float
    infer_img_s: float
    info: dict = field(default_factory=dict)


def _as_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, [1,] H, W) -> (B, S, S); anomalib returns the input size already, this only guards it."""
    if maps.dim() == 4:
        maps = maps[:, 0]
    if tuple(maps.shape[-2:]) != (size, size):
        maps = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return maps


def run_patchcore(cat: Category, lib: dict, state: dict, batch: int, device: torch.device,
                  coreset_ratio: float = 0.01, neighbours: int = 9) -> Outcome:
    torch.manual_seed(0)  # the coreset's random start
    model = lib["PatchcoreModel"](layers=LAYERS, backbone=BACKBONE, pre_trained=False, num_neighbors=neighbours)
    load_backbone(model.feature_extractor.feature_extractor, state)
    model.to(device)
    norm = normalizer(device)
    size = cat.test.shape[-1]
    t0 = time.perf_counter()
    model.train()  # training mode: forward stores the patch embeddings (the backbone itself stays in eval)
    with torch.no_grad():
        for x in batches(cat.train, batch):
            model(norm(x))
    with warnings.catch_warnings():
        # anomalib 2.x's deprecation decorator warns about the old `embeddings` argument on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        model.subsample_embedding(coreset_ratio)
    train_s = time.perf_counter() - t0

    model.eval()
    scores, maps = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches(cat.test, batch):
            out = model(norm(x))
            scores.append(out.pred_score.reshape(-1).cpu())
            maps.append(_as_maps(out.anomaly_map, size).cpu())
    infer_s = time.perf_counter() - t0
    return Outcome(torch.cat(scores).numpy(), torch.cat(maps).numpy(), train_s, len(cat.test) / infer_s,
                   {"memory_bank": int(model.memory_bank.shape[0])})


def _cflow_fibres(model, activation: dict, lib: dict) -> list[tuple[torch.Tensor, torch.Tensor, int, int, int]]:
    """Per layer: (e (B·H·W, C) features, c (B·H·W, P) positional condition, C, H, W), rows in (b, h, w) order."""
    out = []
    for layer in model.pool_layers:
        enc = activation[layer].detach()  # (B, C, H, W)
        b, c, h, w = enc.shape
        pos = lib["positional_encoding_2d"](model.condition_vector, h, w).to(enc.device)  # (P, H, W)
        cond = pos.permute(1, 2, 0).reshape(h * w, -1).repeat(b, 1)  # (B·H·W, P)
        out.append((enc.permute(0, 2, 3, 1).reshape(-1, c), cond, c, h, w))
    return out


def run_cflow(cat: Category, lib: dict, state: dict, batch: int, device: torch.device, epochs: int, lr: float = 1e-4) -> Outcome:
    torch.manual_seed(0)
    model = lib["CflowModel"](backbone=BACKBONE, layers=LAYERS, pre_trained=False)
    load_backbone(model.encoder.feature_extractor, state)
    model.to(device)
    norm = normalizer(device)
    get_logp, fb = lib["get_logp"], model.fiber_batch_size
    params = [p for d in model.decoders for p in d.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    size = cat.test.shape[-1]
    gen = torch.Generator().manual_seed(0)
    losses = []

    t0 = time.perf_counter()
    model.decoders.train()
    for _ in range(epochs):
        total, count = 0.0, 0
        for x in batches(cat.train, batch, torch.randperm(len(cat.train), generator=gen)):
            with torch.no_grad():
                activation = model.encoder(norm(x))
            for d, (e_r, c_r, c, _, _) in enumerate(_cflow_fibres(model, activation, lib)):
                n = e_r.shape[0]
                perm = torch.randperm(n, generator=gen).to(e_r.device)
                n_fb = n // fb  # as anomalib: the last fibre batch takes the remainder
                if n_fb <= 0:
                    raise Unavailable(f"CFlow: {n} fibres per batch are fewer than its fibre batch of {fb}; raise --batch")
                for k in range(n_fb):
                    idx = perm[k * fb : (k + 1) * fb if k < n_fb - 1 else n]
                    p_u, log_jac = model.decoders[d](e_r[idx], [c_r[idx]])
                    log_prob = get_logp(c, p_u, log_jac) / c  # per dimension
                    loss = -F.logsigmoid(log_prob)
                    opt.zero_grad()
                    loss.mean().backward()
                    opt.step()
                    total += float(loss.detach().sum())
                    count += len(idx)
        losses.append(total / max(count, 1))
    train_s = time.perf_counter() - t0

    model.decoders.eval()
    t0 = time.perf_counter()
    dist: list[list[torch.Tensor]] = [[] for _ in model.pool_layers]
    hw: list[tuple[int, int]] = []
    with torch.no_grad():
        for x in batches(cat.test, batch):
            activation = model.encoder(norm(x))
            hw = []
            for d, (e_r, c_r, c, h, w) in enumerate(_cflow_fibres(model, activation, lib)):
                hw.append((h, w))
                for start in range(0, e_r.shape[0], fb):  # anomalib's inference runs fibre batches too
                    p_u, log_jac = model.decoders[d](e_r[start : start + fb], [c_r[start : start + fb]])
                    dist[d].append(get_logp(c, p_u, log_jac) / c)
        # One normalisation over the whole test set (see the module docstring).
        maps = model.anomaly_map_generator(distribution=[torch.cat(v) for v in dist], height=[h for h, _ in hw],
                                           width=[w for _, w in hw], image_size=(size, size))
        maps = _as_maps(maps, size)
        scores = maps.amax(dim=(-2, -1))
    infer_s = time.perf_counter() - t0
    return Outcome(scores.cpu().numpy(), maps.cpu().numpy(), train_s, len(cat.test) / infer_s, {"epoch_loss": losses})


def run_moleflow(cat: Category, epochs: int, batch: int, overrides: list[str]) -> Outcome:
    cfg = load_config(None, [f"train.epochs={epochs}", f"data.image_size={cat.test.shape[-1]}", *overrides])
    seed_everything(cfg.train.seed)  # as `moleflow fit`: the shared flow's initialisation
    system = build_system(cfg)
    if system.extractor.weights_source != "offline-package" and cfg.backbone.name == BACKBONE:
        raise BackboneError(f"moleflow's {BACKBONE} did not get the offline weights ({system.extractor.weights_source})")
    t0 = time.perf_counter()
    patches, desc = [], []
    for x in batches(cat.train, cfg.backbone.batch_size):
        p, d = system.extractor(x.to(system.device))  # (B, H, W, C), (B, D)
        patches.append(p.cpu())
        desc.append(d.cpu())
    n = len(cat.train)
    train = FeatureSet(torch.cat(patches), torch.cat(desc), torch.zeros(n, dtype=torch.long), None,
                       [f"{cat.name}/train/{i}" for i in range(n)], [cat.name] * n)
    _, info = learn_new_task(system, [cat.name], train, progress=False, step=len(system.tasks))
    train_s = time.perf_counter() - t0

    scores, maps = [], []
    t0 = time.perf_counter()
    for x in batches(cat.test, batch):
        _, s, m = predict_batch(system, x)
        scores.append(s)
        maps.append(m)
    infer_s = time.perf_counter() - t0
    return Outcome(torch.cat(scores).numpy(), torch.cat(maps).numpy(), train_s, len(cat.test) / infer_s,
                   {"fit_s": info.seconds, "epoch_loss": list(info.epoch_loss)})


# --------------------------------------------------------------------------- the table


def metrics_of(cat: Category, out: Outcome) -> dict:
    return compute_metrics(cat.labels, out.scores, cat.masks, None if cat.masks is None else out.maps)


def format_table(rows: list[dict], header_note: str) -> str:
    cols = [("category", 14), ("model", 10)] + [(label, 9) for _, label in METRIC_COLUMNS] + [("train s", 9), ("infer img/s", 11)]
    head = " ".join(f"{name:<{w}}" if i < 2 else f"{name:>{w}}" for i, (name, w) in enumerate(cols))
    lines = [header_note, "", head, "-" * len(head)]
    for r in rows:
        cells = [f"{r['category']:<14}", f"{r['model']:<10}"]
        if "error" in r:
            lines.append(" ".join(cells) + f" not run: {r['error']}")
            continue
        for key, _ in METRIC_COLUMNS:
            v = r["metrics"][key]
            cells.append(f"{'-' if v is None else f'{v:.4f}':>9}")
        cells.append(f"{r['train_s']:>9.1f}")
        cells.append(f"{r['infer_img_s']:>11.2f}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", action="append", default=None, metavar="PATH|elpv:CLASS",
                        help="MVTec-layout class folder or class spec (repeatable; default: bottle, elpv:mono, elpv:poly)")
    parser.add_argument("--epochs", type=int, default=Config().train.epochs,
                        help="training epochs of CFlow and moleflow (equal; default: moleflow's train.epochs, %(default)s)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of %(default)s")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass (training and inference)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.01,
                        help="PatchCore's coreset sampling ratio (default %(default)s, the paper's PatchCore-1%%; anomalib's "
                             "default 0.1 makes the greedy search, PatchCore's main cost, 10x longer: about an hour per "
                             "200-image category on this 2-core CPU)")
    parser.add_argument("--max-train", type=int, default=200,
                        help="use the first N training images (default %(default)s, the size of issue 6's task; 0 = all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="moleflow config override (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.epochs < 1 or args.batch < 1:
        parser.error("--epochs and --batch must be >= 1")
    if not 0 < args.coreset_ratio <= 1:
        parser.error("--coreset-ratio must lie in (0, 1]")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device("auto")

    lib, state, lib_error = None, None, None
    if {"patchcore", "cflow"} & set(models):
        try:
            lib = import_anomalib()
            state = offline_backbone_state()
        except (Unavailable, BackboneError) as exc:
            lib_error = str(exc)
            log(f"peers: PatchCore and CFlow cannot run: {exc}")

    rows: list[dict] = []
    for spec in args.category or list(DEFAULT_CATEGORIES):
        try:
            log(f"loading {spec} ...")
            cat = load_category(spec, args.image_size, args.max_train)
        except (DatasetError, ConfigError) as exc:
            log(f"peers: skipping category {spec}: {exc}")
            rows += [{"category": spec, "model": m, "error": str(exc)} for m in models]
            continue
        log(f"{cat.name}: {len(cat.train)} training, {len(cat.test)} test images ({int(cat.labels.sum())} defective), "
            f"{'with' if cat.masks is not None else 'no'} masks")
        for m in models:
            row = {"category": cat.name, "model": m}
            if m in ("patchcore", "cflow") and lib is None:
                row["error"] = "anomalib unavailable (see above)"
                rows.append(row)
                continue
            log(f"  {m} ...")
            try:
                if m == "patchcore":
                    out = run_patchcore(cat, lib, state, args.batch, device, args.coreset_ratio)
                elif m == "cflow":
                    out = run_cflow(cat, lib, state, args.batch, device, args.epochs)
                else:
                    out = run_moleflow(cat, args.epochs, args.batch, args.set)
            except (Unavailable, BackboneError, ConfigError, DatasetError) as exc:
                row["error"] = str(exc)
                log(f"  {m}: {exc}")
                rows.append(row)
                continue
            row.update({"metrics": metrics_of(cat, out), "train_s": out.train_s, "infer_img_s": out.infer_img_s, "info": out.info})
            log(f"  {m}: " + ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items() if v is not None)
                + f", train {out.train_s:.1f} s, {out.infer_img_s:.2f} img/s")
            rows.append(row)
        del cat

    note = (f"{BACKBONE} layers {LAYERS} (offline weights) for every model, {args.image_size} px, epochs {args.epochs} "
            f"(CFlow, moleflow), PatchCore coreset {args.coreset_ratio:g}, "
            f"{'all' if args.max_train <= 0 else f'at most {args.max_train}'} training images, batch {args.batch}, {torch.get_num_threads()} threads (OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}), torch {torch.__version__}"
            + (f", anomalib {lib['version']}" if lib else ""))
    if args.json:
        print(json.dumps({"note": note, "rows": rows, "anomalib_error": lib_error}, indent=2, default=float))
    else:
        print(format_table(rows, note))
        if lib_error:
            print(f"\nPatchCore / CFlow not run: {lib_error}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
