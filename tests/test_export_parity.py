"""Exported scoring chains score every image of a batch as PyTorch does, at batch sizes above the traced
example's (2), for a task whose map is the memory alone (w = 1), a blend (w < 1) and the flow alone.

At 128 px a batch of 8 holds 2,048 patches: more than one 1,024-row block of the memory's nearest-patch
search, which a trace once unrolled to the example's single block (images 3+ then scored 0)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from helpers import CONFIGS  # noqa: E402
from moleflow import Detector  # noqa: E402
from moleflow.continual.system import load_system  # noqa: E402
from moleflow.data import load_image  # noqa: E402
from moleflow.export import OnnxScorer, export_onnx  # noqa: E402

pytestmark = pytest.mark.slow
BATCHES = (1, 3, 8, 16)
SIZE = 128


@pytest.fixture(scope="module")
def model_128(striped_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parity") / "run"
    Detector.fit(CONFIGS / "smoke.yaml", out, [f"data.root={striped_root}", f"data.image_size={SIZE}",
                                               "scenario.tasks=[[bottle],[grid],[screw]]"])
    return out / "model"


def _variant(model_dir: Path, kind: str):
    """The saved model with task weights 1 / 0.8 / 0.9 (memory alone, blends), or scored by the flow alone."""
    system = load_system(model_dir)
    if kind == "blend":
        for t, w in enumerate((1.0, 0.8, 0.9)):
            system.model.set_memory_weight(t, w)
    else:
        system.cfg = dataclasses.replace(system.cfg, scoring=dataclasses.replace(system.cfg.scoring, patch_score="latent"))
    return system


@pytest.mark.parametrize("kind", ["blend", "flow"])
@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_every_image_of_every_batch_size_scores_as_pytorch(model_128, striped_root, tmp_path, kind, runtime):
    pytest.importorskip({"onnx": "onnxruntime", "openvino": "openvino"}[runtime])
    system = _variant(model_128, kind)
    export_onnx(system, model_128, tmp_path / "export")
    onnx = OnnxScorer(tmp_path / "export", system, runtime)
    paths = sorted(p for cls in ("bottle", "grid", "screw") for p in (striped_root / cls / "test").rglob("*.png"))
    images = torch.stack([load_image(p, SIZE) for p in paths])  # (24, 3, S, S): every product, good and defective
    for batch in BATCHES:
        for start in range(0, len(images) - batch + 1, max(batch, 7)):
            x = images[start : start + batch]
            ref, got = system.scorer.score_images(x), onnx.score_images(x)
            assert torch.equal(ref.tasks, got.tasks)
            assert set(ref.tasks.tolist()) <= {0, 1, 2}
            np.testing.assert_allclose(got.image.numpy(), ref.image.numpy(), rtol=1e-4, err_msg=f"batch {batch} at {start}")
            scale = max(1.0, float(ref.maps.abs().max()))
            assert float((ref.maps - got.maps).abs().max()) <= 1e-3 * scale
            thresholds = torch.tensor([system.tasks[t].threshold for t in ref.tasks.tolist()])
            assert torch.equal(ref.image > thresholds, got.image > thresholds)  # the verdicts
    assert {int(t) for t in system.scorer.score_images(images).tasks} == {0, 1, 2}  # every task exercised
