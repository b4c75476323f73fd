"""Each task's memory weight: CutPaste defects (data/synthetic.py), the choice on them
(continual/blend_weight.py), and the weight stored with the task and read by the scorer."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_memory_model

from moleflow.config import ScoringConfig
from moleflow.continual.blend_weight import blend_quality, choose_memory_weight
from moleflow.data.synthetic import cutpaste, synthetic_defects
from moleflow.scoring import task_patch_scores


def _image(seed: int, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g)


def test_cutpaste_marks_exactly_the_visibly_changed_pixels_and_a_scar_is_thin():
    image = _image(0, 256)
    for kind in ("patch", "scar"):
        for seed in range(5):
            out, mask = cutpaste(image, kind, torch.Generator().manual_seed(seed))
            changed = (out - image).abs().amax(dim=0)
            assert torch.equal(mask, changed > 0.1) and mask.any()
            ys, xs = (out != image).any(dim=0).nonzero(as_tuple=True)  # the pasted rectangle
            h, w = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
            if kind == "scar":
                assert min(h, w) <= 6 and 16 <= max(h, w) <= 48
            else:
                assert 0.004 * 256 ** 2 <= h * w <= 0.031 * 256 ** 2


def test_synthetic_defects_are_seeded_and_drop_invisible_pastes():
    images = torch.stack([_image(1), _image(2)])
    a, ma = synthetic_defects(images, per_image=2, seed=7)
    b, mb = synthetic_defects(images, per_image=2, seed=7)
    assert torch.equal(a, b) and torch.equal(ma, mb) and len(a) == 8  # 2 images × 2 kinds × 2
    assert not torch.equal(a, synthetic_defects(images, per_image=2, seed=8)[0])
    # on a flat grey image only the brightness jitter shows: pastes that change nothing visibly are gone
    flat, masks = synthetic_defects(torch.full((3, 3, 64, 64), 0.5), per_image=3, seed=0)
    assert len(flat) == len(masks) <= 18 and all(int(m.sum()) * 4096 >= 64 * 64 for m in masks)


def test_the_quality_favours_whichever_part_sits_on_the_defects():
    g = torch.Generator().manual_seed(0)
    truth = torch.zeros(12, 64, 64, dtype=torch.bool)
    truth[6:, 16:32, 16:32] = True  # six defective images, a 2×2-patch defect on the 8×8 grid
    signal = torch.rand(12, 8, 8, generator=g)
    signal[6:, 2:4, 2:4] += 2.0
    noise = torch.rand(12, 8, 8, generator=g) * 2
    weights = (0.0, 0.5, 1.0)
    memory_knows = blend_quality(noise, signal, truth.numpy(), weights, 64, 2.0)
    flow_knows = blend_quality(signal, noise, truth.numpy(), weights, 64, 2.0)
    assert memory_knows[2] > memory_knows[1] > memory_knows[0]
    assert flow_knows[0] > flow_knows[1] > flow_knows[2]


class _Extractor:
    """Stands in for the backbone: (B, 3, 32, 32) images -> (B, 4, 4, 8) patches (the mean of each
    8×8 cell's channels, repeated), so a pasted piece changes the patches it covers."""

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cells = torch.nn.functional.avg_pool2d(images, 8).permute(0, 2, 3, 1)  # (B, 4, 4, 3)
        patches = torch.cat([cells, cells, cells[..., :2]], dim=-1) * 4  # (B, 4, 4, 8)
        return patches, patches.mean(dim=(1, 2))


def test_the_chosen_weight_is_stored_with_the_task_saved_and_read_by_the_scorer(tmp_path):
    model, extractor = tiny_memory_model(), _Extractor()
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((_image(10 + i, 32).permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(paths[-1])
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255).permute(2, 0, 1) for p in paths])
    model.fit_memory(1, extractor(images)[0], seed=0)
    cfg = ScoringConfig(memory_weights=[0.8, 0.9, 1.0], blur_sigma=2.0)
    choice = choose_memory_weight(model, extractor, 1, paths, 32, cfg, seed=0)
    assert choice.weight in (0.8, 0.9, 1.0) and len(choice.quality) == 3 and choice.n_defects > 0
    assert choice.quality[(0.8, 0.9, 1.0).index(choice.weight)] == max(choice.quality)
    assert choice == choose_memory_weight(model, extractor, 1, paths, 32, cfg, seed=0)  # seeded

    x = extractor(images[:2])[0]
    with torch.no_grad(), model.use_task(1):
        before = task_patch_scores(model, x, cfg)  # no weight stored yet: scoring.memory_weight (0.8)
        model.set_memory_weight(1, 0.3)
        z, _ = model(x)
        d, scale = model.memory_distance(x)
        torch.testing.assert_close(task_patch_scores(model, x, cfg), 0.7 * z.norm(dim=-1) / scale[0] + 0.3 * d / scale[1])
        torch.testing.assert_close(before, 0.2 * z.norm(dim=-1) / scale[0] + 0.8 * d / scale[1])
        fixed = ScoringConfig(memory_weight_from="fixed", memory_weight=0.8)
        torch.testing.assert_close(task_patch_scores(model, x, fixed), before)  # "fixed" ignores the choice
    # the weight travels with the task's tensors; a task file written before it existed still loads
    sd = model.task_state_dict(1)
    assert float(sd["memory.1.weight"]) == pytest.approx(0.3)
    other = tiny_memory_model()
    other.load_task_state_dict(1, sd)
    old = tiny_memory_model()
    old.load_shared_state_dict(model.shared_state_dict())
    old.load_task_state_dict(1, {k: v for k, v in sd.items() if k != "memory.1.weight"})
    with torch.no_grad():
        with other.use_task(1):
            assert other.memory_weight() == 0.3
        with old.use_task(1):
            assert old.memory_weight() is None
            torch.testing.assert_close(task_patch_scores(old, x, cfg), before)
