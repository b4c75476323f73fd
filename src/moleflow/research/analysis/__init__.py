"""`moleflow analyze tail`: why does the tail-aware loss help? (METHOD.md §7, seeds/tail-aware-loss-analysis.md §4)

Two trained run directories are compared, one trained with the plain mean NLL (loss.tail_weight = 0) and
one with the tail-aware loss, on one task (default 0). Seven measurements, each with its statistic:

1. where the top-ρ NLL patches of the training images lie: distance to the image border (two-sample KS
   against all patches' distances, which is exact for the grid), Spearman of patch NLL with the image
   gradient magnitude (Sobel of the grey image, averaged per patch cell);
2. cosine similarity of the train-tail backbone features to test-defect vs test-good features;
3. gradient norms per coupling block during training (results.json, train.record_grad_norms=true);
4. latent calibration of z on test-good patches: QQ correlation, tail-quantile error, per-channel
   normality (D'Agostino–Pearson);
5. separation of good and defective pixel scores: Fisher ratio and histogram overlap;
6. per-block log-det statistics on test-good patches (and the defect − good shift);
7. the weight each patch gets in the loss (∂L/∂n by autograd) and its Gini coefficient, and, given
   sweep runs, tail ratio vs image AUROC / pixel AP / Gini.

Everything runs on a subsample (`max_images` images per split, patch subsamples for the statistics),
so it is CPU-cheap. The output folder gets `analysis.md`, `analysis.json` (the numbers) and PNG figures.

The package, by what each module produces: `loading` (the runs, their results.json, the features and the
flow's outputs through the Scorer), `statistics` (pure functions of arrays), `measurements` (the seven
measurements of a run), `figures` (the PNGs), `report` (analysis.md), `suite` (`analyze_tail`, which runs
them all and writes analysis.json).
"""
from moleflow.research.analysis.suite import analyze_tail

__all__ = ["analyze_tail"]
