"""Images per second of feature extraction (backbone + multi-scale merge) for the offline-usable backbones.

    python benchmarks/backbone.py [--image-size 256] [--batch 16] [--warmup 2] [--batches 4]

Rows: tf_efficientnet_lite0 with its offline ImageNet weights (layers [1,2,3] and [2,3]) and
wide_resnet50_2 with random weights, layers [2,3] (the paper's backbone; random weights cost the same
time as trained ones), each with and without channels_last, and with the neighbourhood average on each
layer's grid (`local_avg_at` layer, the default) or on the merged grid (merged, the seeds'). Uses torch's default thread count unless
--threads is given. Other jobs on the same cores distort the figures badly (OpenMP threads wait for
each other): compare rows of one run on an otherwise idle machine.
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import time

import torch

from moleflow.features.backbone import FeatureExtractor
from moleflow.config import BackboneConfig

ROWS = [
    ("tf_efficientnet_lite0", [1, 2, 3], "auto"),
    ("tf_efficientnet_lite0", [2, 3], "auto"),
    ("wide_resnet50_2", [2, 3], "none"),
]


def images_per_second(extractor: FeatureExtractor, images: torch.Tensor, warmup: int, batches: int) -> tuple[float, float]:
    """(mean, best) images per second over the timed batches; the best batch is the least disturbed by
    other jobs on the machine."""
    for _ in range(warmup):
        extractor(images)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        extractor(images)
        times.append(time.perf_counter() - start)
    n = images.shape[0]
    return n * len(times) / sum(times), n / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--batches", type=int, default=4, help="timed batches")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    images = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.image_size} px, batch {args.batch}, "
          f"{args.warmup} warm-up + {args.batches} timed batches")
    header = f"{'backbone':<22} {'layers':<10} {'weights':<16} {'grid':<7} {'C':>5} {'channels_last':>13} {'avg at':>7} {'img/s mean':>10} {'img/s best':>10}"
    print(header)
    print("-" * len(header))
    for name, layers, weights in ROWS:
        for channels_last in (True, False):
            for at in ("layer", "merged"):
                cfg = BackboneConfig(name=name, layers=layers, weights=weights, channels_last=channels_last, local_avg_at=at)
                extractor = FeatureExtractor(cfg, args.image_size)
                mean, best = images_per_second(extractor, images, args.warmup, args.batches)
                grid = f"{extractor.grid[0]}x{extractor.grid[1]}"
                print(f"{name:<22} {str(layers):<10} {extractor.weights_source:<16} {grid:<7} {extractor.out_channels:>5} "
                      f"{str(channels_last):>13} {at:>7} {mean:>10.1f} {best:>10.1f}", flush=True)
                del extractor


if __name__ == "__main__":
    main()
