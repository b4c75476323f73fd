import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from moleflow.scoring import anomaly_map, gaussian_blur, gaussian_kernel1d, image_score, patch_scores


def test_patch_scores_nll_is_the_gaussian_negative_log_likelihood():
    z, ld = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    # change of variables: −log p(x) = −log N(z; 0, I) − log|det J|, up to the constant C/2·log(2π)
    log_normal = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    const = 0.5 * 5 * np.log(2 * np.pi)
    torch.testing.assert_close(patch_scores(z, ld, "nll") + const, -(log_normal + ld))
    # the latent score ignores the flow's volume change: shifting log_det changes nothing
    torch.testing.assert_close(patch_scores(z, ld, "latent"), patch_scores(z, ld + 3.0, "latent"))
    torch.testing.assert_close(patch_scores(z, ld, "latent") + const, -log_normal)
    with pytest.raises(ValueError, match="patch_score"):
        patch_scores(z, ld, "both")


def test_image_score_aggregations():
    s = torch.tensor([[[1.0, 5.0], [3.0, 2.0]], [[0.0, 0.0], [4.0, -1.0]]])
    torch.testing.assert_close(image_score(s, "topk", 3), torch.tensor([(5 + 3 + 2) / 3, (4 + 0 + 0) / 3]))
    torch.testing.assert_close(image_score(s, "topk", 1), torch.tensor([5.0, 4.0]))
    torch.testing.assert_close(image_score(s, "topk", 10), s.reshape(2, -1).mean(1))  # k clipped to H·W
    torch.testing.assert_close(image_score(s, "max"), torch.tensor([5.0, 4.0]))
    torch.testing.assert_close(image_score(s, "mean"), torch.tensor([2.75, 0.75]))
    with pytest.raises(ValueError, match="aggregation"):
        image_score(s, "median")


def test_gaussian_kernel():
    k = gaussian_kernel1d(4.0)
    assert k.numel() == 33 and float(k.sum()) == pytest.approx(1.0) and int(k.argmax()) == 16


def test_anomaly_map_shape_and_constant_map():
    scores = torch.full((2, 8, 8), 7.0)
    amap = anomaly_map(scores, 64, sigma=4.0)
    assert amap.shape == (2, 64, 64)
    torch.testing.assert_close(amap, torch.full_like(amap, 7.0))
    tiny = anomaly_map(torch.full((1, 2, 2), -3.0), 8, sigma=4.0)  # blur radius 16 > image size 8
    torch.testing.assert_close(tiny, torch.full((1, 8, 8), -3.0))


def test_blur_matches_scipy_and_upsampling_is_bilinear():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    amap = anomaly_map(scores, 40, sigma=2.0)
    up = F.interpolate(scores[:, None], size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(anomaly_map(scores, 40, sigma=0.0), up)
    for i in range(2):
        expected = ndimage.gaussian_filter(up[i].numpy(), sigma=2.0, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(amap[i].numpy(), expected, atol=1e-10)
    # small image, radius larger than the side: still scipy's symmetric extension
    m = torch.randn(1, 5, 7, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(gaussian_blur(m, 1.5)[0].numpy(), ndimage.gaussian_filter(m[0].numpy(), 1.5, truncate=4.0), atol=1e-10)
