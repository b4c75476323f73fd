"""analysis.md: the two runs, then one section per measurement (its method, a table of both runs' numbers,
a reading where one is simple, and its figure)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moleflow.research.analysis.loading import Run
from moleflow.research.analysis.statistics import CALIBRATION_QUANTILES, MAX_NORMALITY_PATCHES, MAX_PIXELS, MAX_STAT_PATCHES


@dataclass
class Report:
    """Everything analysis.md (and analysis.json) is written from."""

    runs: list[Run]  # mean-only, tail-aware
    per_run: list[dict[str, Any]]  # measure_run of each
    grads: dict[str, Any]  # grad_norm_table
    sweep_rows: list[dict[str, Any]]
    sweep_skipped: list[str]
    pngs: dict[str, str]  # measurement number -> figure file name
    diff: list[list[Any]]  # config_diff rows [key, mean-only value, tail-aware value]
    max_images: int

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.runs]

    def pair(self, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Measurement `key` of the two runs."""
        a, b = self.per_run
        return a[key], b[key]


# --------------------------------------------------------------------------- formatting


def _f(x: Any, nd: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    x = float(x)
    if math.isnan(x):
        return "nan"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3e}"
    return f"{x:.{nd}f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table and the blank line after it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + [":---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else _f(c) for c in r) + " |")
    return ["\n".join(lines), ""]


def _diff_line(a: float | None, b: float | None, what: str) -> str:
    if a is None or b is None:
        return ""
    return f"tail-aware − mean-only {what}: {b - a:+.4f}."


def _not_applicable(res: dict[str, Any]) -> list[str]:
    return [res["reason"].capitalize() + ".", ""]


# --------------------------------------------------------------------------- sections


def _header(rep: Report) -> list[str]:
    a = rep.per_run[0]
    first = rep.runs[0]
    lines = ["# Tail-aware loss analysis", ""]
    lines.append(f"Task {first.task} ({'+'.join(first.system.tasks[first.task].classes)}); up to {rep.max_images} images per "
                 f"split (train {a['n_train_images']}, test {a['n_test_images']}). METHOD.md §7, seeds/tail-aware-loss-analysis.md §4.")
    lines.append("")
    lines += _table(["run", "directory", "tail_weight", "tail_ratio", "image AUROC", "pixel AUROC", "pixel AP"],
                    [[r.label, f"`{r.path}`", r.loss.tail_weight, r.loss.tail_ratio, r.metrics()["image_auroc"],
                      r.metrics()["pixel_auroc"], r.metrics()["pixel_ap"]] for r in rep.runs])
    other = [d for d in rep.diff if d[0] != "loss.tail_weight"]
    if first.loss.tail_weight != 0:
        lines.append(f"**Note:** the mean-only run has loss.tail_weight = {first.loss.tail_weight}, not 0.")
    if other:
        lines.append("**Note:** the runs differ in more than loss.tail_weight: "
                     + ", ".join(f"`{k}` ({x!r} vs {y!r})" for k, x, y in other) + ".")
    lines.append("")
    return lines


SPATIAL_ROWS = (
    ("n_tail", "tail patches"), ("mean_border_distance_tail", "mean border distance, tail"),
    ("mean_border_distance_all", "mean border distance, all patches"),
    ("outer_ring_frac_tail", "fraction on the outer ring, tail"),
    ("outer_ring_frac_all", "fraction on the outer ring, all patches"),
    ("ks_stat", "KS statistic"), ("ks_p", "KS p-value"),
    ("spearman_nll_gradient", "Spearman ρ(NLL, image gradient)"), ("spearman_p", "Spearman p-value"),
    ("gradient_tail_over_rest", "image gradient, tail / rest"),
)


def _spatial(rep: Report) -> list[str]:
    sa, sb = rep.pair("spatial")
    scope = "over all analysed images" if sa["tail_scope"] == "batch" else "within each image"
    lines = [f"Top ρ = {sa['tail_ratio']} of the training patches by NLL ({scope}, as loss.tail_scope = {sa['tail_scope']}), "
             f"{sa['n_images']} images, grid {sa['grid'][0]}×{sa['grid'][1]}. Border distance in patches (0 = outermost ring); "
             "KS: two-sample test of the tail's border distances against all patches' (= uniform positions). "
             "Spearman: patch NLL vs mean Sobel gradient magnitude of the grey image in the patch cell.", ""]
    lines += _table(["statistic", *rep.labels], [[name, sa[key], sb[key]] for key, name in SPATIAL_ROWS])
    for lab, s in zip(rep.labels, (sa, sb)):
        where = "nearer to" if s["mean_border_distance_tail"] < s["mean_border_distance_all"] else "farther from"
        sig = "differ significantly from" if s["ks_p"] < 0.05 else "do not differ significantly from"
        lines.append(f"- {lab}: on average the tail lies {where} the border than all patches do "
                     f"({_f(s['mean_border_distance_tail'], 2)} vs {_f(s['mean_border_distance_all'], 2)} patches); its border "
                     f"distances {sig} uniform positions (KS p = {_f(s['ks_p'])}); Spearman of NLL with the image gradient "
                     f"{_f(s['spearman_nll_gradient'], 3)}.")
    return lines + [""]


def _similarity(rep: Report) -> list[str]:
    ra, rb = rep.pair("similarity")
    if not ra.get("applicable"):
        return _not_applicable(ra)
    lines = [f"Backbone patch features. Tail: top-ρ training patches of each run. Defect patches: {ra['defect_rule']} "
             f"({ra['n_defect']} patches); good: all patches of good test images ({ra['n_good']}). Prototype: cosine "
             "of the mean vectors; nearest: mean over test patches of the cosine to their most similar tail patch. "
             "'Centred' subtracts the mean training feature first, so that an offset shared by all features does "
             "not dominate the cosine.", ""]
    rows = []
    for kind in ("raw", "centred"):
        for how in ("proto", "nearest"):
            for lab, r in zip(rep.labels, (ra, rb)):
                d, g = r[f"{kind}_{how}_defect"], r[f"{kind}_{how}_good"]
                # a ratio of cosines only reads as "how much more similar" when both are positive
                rows.append([f"{kind}, {how}", lab, d, g, d - g, d / g if d > 0 and g > 0 else None])
    lines += _table(["cosine", "run", "to test defect", "to test good", "difference", "ratio"], rows)
    return lines + ["A difference > 0 (ratio > 1) means the train tail resembles test defects more than test goods (H2); "
                    "the ratio is left out when a cosine is not positive.", ""]


def _grad_norms(rep: Report) -> list[str]:
    grads = rep.grads
    if not grads["recorded"]:
        return [f"Not recorded for {', '.join(grads['missing'])}: train with `train.record_grad_norms=true` "
                "(results.json then holds, per epoch, the mean gradient norm of each coupling block).", ""]
    lines = [f"Mean over epochs ({grads['epochs'][0]} / {grads['epochs'][1]}) of the per-step gradient norm of each "
             "base-flow coupling block (before clipping); ratio = tail-aware / mean-only, also for the first and last epoch.", ""]
    return lines + _table(["block", *rep.labels, "ratio", "ratio, first epoch", "ratio, last epoch"],
                          [[r["block"], r["mean_only"], r["tail_aware"], r["ratio"], r["first_ratio"], r["last_ratio"]]
                           for r in grads["rows"]])


def _latent_keys() -> list[tuple[str, str]]:
    keys = [("qq_r", "QQ correlation r"), ("z_mean", "mean of z"), ("z_std", "std of z"), ("sq_norm_per_dim", "‖z‖²/C")]
    for p in CALIBRATION_QUANTILES:
        keys += [(f"q_err_{p}", f"quantile error at {p}"), (f"q_err_{1 - p:.3g}", f"quantile error at {1 - p:.3g}")]
    return keys + [("normal_frac_p_gt_0.05", "channels with normality p > 0.05"), ("normal_median_p", "median normality p")]


def _latent(rep: Report) -> list[str]:
    la, lb = rep.pair("latent")
    if la.get("applicable") is False or lb.get("applicable") is False:
        return ["Not applicable: the test set has no good images.", ""]
    lines = [f"z of up to {MAX_STAT_PATCHES} patches of good test images. QQ r: scipy.stats.probplot correlation of all "
             "z components with N(0,1); quantile error |empirical − normal| at p; normality: D'Agostino–Pearson "
             f"test per channel on {MAX_NORMALITY_PATCHES} of the patches (neighbouring patches are correlated, so "
             "the p-values come out smaller than for independent samples: compare the runs rather than read them "
             "absolutely); ‖z‖²/C should be 1.", ""]
    rows = [["patches × channels", f"{la['n_patches']} × {la['channels']}", f"{lb['n_patches']} × {lb['channels']}", ""]]
    for k, name in _latent_keys():
        rows.append([name, la[k], lb[k], None if la[k] is None or lb[k] is None else lb[k] - la[k]])
    return lines + _table(["statistic", *rep.labels, "tail − mean"], rows)


SEPARATION_ROWS = (
    ("mean_good", "mean, good"), ("std_good", "std, good"), ("mean_defect", "mean, defect"),
    ("std_defect", "std, defect"), ("fisher", "Fisher ratio"), ("overlap", "histogram overlap"),
    ("pixel_auroc_subsample", "pixel AUROC (these pixels)"),
)


def _separation(rep: Report) -> list[str]:
    ea, eb = rep.pair("separation")
    if not ea.get("applicable"):
        return _not_applicable(ea)
    lines = ["Anomaly maps (upsampled, blurred patch scores) of the analysed test images; good = pixels outside the "
             f"masks, defect = inside (subsampled to ≤ {MAX_PIXELS} each). Fisher = (μ1−μ0)²/(σ1²+σ0²); overlap = "
             "intersection of the two normalised 100-bin histograms.", ""]
    lines += _table(["statistic", *rep.labels], [[name, ea[k], eb[k]] for k, name in SEPARATION_ROWS])
    reading = _diff_line(ea["fisher"], eb["fisher"], "Fisher ratio") + " " + _diff_line(ea["overlap"], eb["overlap"], "overlap")
    return lines + [reading, ""]


def _logdets(rep: Report) -> list[str]:
    ga, gb = rep.pair("logdet")
    if not ga.get("applicable"):
        return _not_applicable(ga)
    la, lb = rep.labels
    lines = ["Per-patch log|det J| of each base-flow coupling block (in BaseFlow order), of the whole DIA and the "
             "total, on patches of good test images; 'defect − good': mean on defect patches minus mean on good ones.", ""]
    rows = [[x["part"], x["mean"], x["std"], y["mean"], y["std"], y["mean"] - x["mean"], x["defect_minus_good"], y["defect_minus_good"]]
            for x, y in zip(ga["rows"], gb["rows"])]
    return lines + _table(["part", f"mean, {la}", f"std, {la}", f"mean, {lb}", f"std, {lb}",
                           "Δ mean", f"defect − good, {la}", f"defect − good, {lb}"], rows)


CONCENTRATION_HEAD = ["run", "w", "ρ", "Gini", "Gini exact", "effective patches", "tail share", "image AUROC", "pixel AP"]


def _concentration_row(name: str, c: dict[str, Any]) -> list[Any]:
    return [name, c["tail_weight"], c["tail_ratio"], c["gini"], c["gini_exact"], c["effective_patches"], c["tail_share"],
            c.get("image_auroc"), c.get("pixel_ap")]


def _concentration(rep: Report) -> list[str]:
    ca, cb = rep.pair("concentration")
    lines = [f"Loss weight of each patch = ∂L/∂n_patch, by autograd through the run's own loss (NLL part) on "
             f"{ca['n_batches']} training batch(es) of {ca['batch_images']} images ({ca['batch_patches']} patches, "
             f"K = {ca['tail_count']} in the tail). For the batch-scope loss it is (1−w)/N + w/K in the top ρ and (1−w)/N "
             "elsewhere, whose Gini is exactly w·(1 − K/N). Effective patches = exp(entropy of the weights); tail "
             "share = fraction of the total weight on the top K.", ""]
    lines += _table(CONCENTRATION_HEAD, [_concentration_row(lab, c) for lab, c in zip(rep.labels, (ca, cb))])
    if rep.sweep_rows:
        lines += ["Sweep (sorted by ρ):", ""]
        lines += _table(CONCENTRATION_HEAD, [_concentration_row(f"`{r['run']}`", r)
                                             for r in sorted(rep.sweep_rows, key=lambda r: r["tail_ratio"])])
    else:
        lines += ["No sweep runs given (`--sweep RUN_DIR...`, e.g. a `moleflow grid ... --vary loss.tail_ratio=0.01,0.02,0.05` folder).", ""]
    if rep.sweep_skipped:
        lines += ["Skipped: " + "; ".join(rep.sweep_skipped), ""]
    return lines


SECTIONS: tuple[tuple[str, str, Callable[[Report], list[str]]], ...] = (
    ("1", "Where tail patches lie", _spatial),
    ("2", "Train-tail features vs test defect / good features", _similarity),
    ("3", "Gradient norms per coupling block during training", _grad_norms),
    ("4", "Latent calibration (test good patches)", _latent),
    ("5", "Separation of good and defective pixel scores", _separation),
    ("6", "Per-block log-det statistics", _logdets),
    ("7", "Gradient concentration and the tail-ratio sweep", _concentration),
)


def markdown(rep: Report) -> str:
    """The text of analysis.md."""
    lines = _header(rep)
    for key, title, body in SECTIONS:
        lines += [f"## {key}. {title}", "", *body(rep)]
        if key in rep.pngs:  # a measurement that does not apply has no figure
            lines += [f"![]({rep.pngs[key]})", ""]
    return "\n".join(lines).rstrip() + "\n"
