"""Selective answering: how well does the model know when to abstain?

A question is answered when its confidence (the top softmax probability) is at or above a
threshold, and abstained on otherwise. Questions with equal confidence are always answered
or abstained on together, so each curve has one point per distinct confidence.

- coverage: the fraction of questions answered; risk: 1 - mean VQA accuracy of those.
- coverage at risk R: the largest coverage whose risk is <= R (Whitehead et al. 2022 report
  R = 1 %, 5 %, 10 %, 20 %).
- AURC: the mean risk over the coverages i/N, i = 1..N (Geifman et al. 2019, "Bias-reduced
  uncertainty estimation for deep neural classifiers"). The reliable_vqa script takes
  sklearn.metrics.auc (trapezoids) over the same points instead; the two differ by
  (risk at 1/N + risk at 1) / 2N, at most 1/N.
- Effective reliability Phi_c (Whitehead, Petryk, Shakib, Gonzalez, Darrell, Rohrbach and
  Rohrbach, ECCV 2022, "Reliable Visual Question Answering: Abstain Rather Than Answer
  Incorrectly", arXiv 2204.13631; the definition as written in facebookresearch/reliable_vqa
  modules/metrics.py and computed by its eval_scripts/reliable_vqa_eval.py): per question,
  Acc(x) if answered and Acc(x) > 0, -c if answered and Acc(x) = 0, 0 if abstained; Phi_c
  is the mean over all questions. A wrong answer costs c, an abstention nothing. The
  eval script answers when confidence >= threshold, reports c = 1, 10, 100, and picks the
  threshold on a validation split as the lowest confidence reaching the largest Phi_c.

Numbers are fractions in [0, 1]; `summary` gives percent with 2 decimals, as metrics.json
and the paper do.
"""

from pathlib import Path

import numpy as np

# Risks are compared with this slack: sums of VQA accuracies (multiples of 1/30) carry float
# rounding, and 1 - 0.99 is 0.010000000000000009, which must count as "risk <= 1 %".
RISK_SLACK = 1e-9
SUMMARY_RISKS = (0.01, 0.05)
SUMMARY_COSTS = (1, 10)


def _check(confidence, accuracy) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64)
    acc = np.asarray(accuracy, dtype=np.float64)
    if conf.ndim != 1 or acc.ndim != 1:
        raise ValueError(f"confidence and accuracy must be 1-D, got shapes {conf.shape} and {acc.shape}")
    if len(conf) != len(acc):
        raise ValueError(f"confidence has {len(conf)} values but accuracy has {len(acc)}: one of each per question")
    if not len(conf):
        raise ValueError("no questions: confidence and accuracy are empty")
    if not np.isfinite(conf).all():
        raise ValueError(f"confidence holds {int((~np.isfinite(conf)).sum())} NaN or infinite values")
    outside = ~((acc >= 0) & (acc <= 1))  # NaN is outside too
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise ValueError(f"accuracy must be in [0, 1]: {int(outside.sum())} values are not "
                         f"(first: accuracy[{first}] = {acc[first]})")
    return conf, acc


def _groups(conf: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, answered, cumulative sum of `values`) at each distinct confidence, highest first."""
    order = np.argsort(-conf, kind="stable")
    conf, cumulative = conf[order], np.cumsum(values[order])
    last = np.flatnonzero(np.append(conf[1:] != conf[:-1], True))  # last question of each tie group
    return conf[last], last + 1, cumulative[last]


def abstain_all_threshold(confidence) -> float:
    """A threshold above every confidence (and above 1.0): answer nothing."""
    return float(np.nextafter(max(1.0, float(np.max(confidence))), np.inf))


def risk_coverage_curve(confidence, accuracy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coverage, risk, thresholds), one entry per distinct confidence, thresholds descending:
    answering the questions with confidence >= thresholds[i] covers coverage[i] at risk[i]."""
    conf, acc = _check(confidence, accuracy)
    thresholds, answered, correct = _groups(conf, acc)
    return answered / len(conf), 1.0 - correct / answered, thresholds


def coverage_at_risk(confidence, accuracy, target_risk: float) -> float:
    """The largest coverage whose risk is <= target_risk; 0.0 when no threshold reaches it."""
    coverage, risk, _ = risk_coverage_curve(confidence, accuracy)
    reached = risk <= target_risk + RISK_SLACK
    return float(coverage[reached].max()) if reached.any() else 0.0


def choose_threshold(confidence, accuracy, target_risk: float = 0.01) -> float:
    """The lowest confidence threshold whose answered set has risk <= target_risk (answer
    when confidence >= it). Meant for the validation split; when no threshold reaches the
    target, a threshold above every confidence (abstain on everything)."""
    coverage, risk, thresholds = risk_coverage_curve(confidence, accuracy)
    reached = np.flatnonzero(risk <= target_risk + RISK_SLACK)
    return float(thresholds[reached[-1]]) if len(reached) else abstain_all_threshold(confidence)


def aurc(confidence, accuracy) -> float:
    """Area under the risk-coverage curve: mean risk over coverages 1/N .. N/N (lower is better)."""
    coverage, risk, _ = risk_coverage_curve(confidence, accuracy)
    widths = np.diff(coverage, prepend=0.0)  # a tie group of k questions spans k/N of coverage
    return float(widths @ risk)


def _payoffs(acc: np.ndarray, c: float) -> np.ndarray:
    """Phi_c of each question if answered: its accuracy when > 0, else -c."""
    if c < 0:
        raise ValueError(f"the cost c of a wrong answer must be >= 0, got {c}")
    return np.where(acc > 0, acc, -float(c))


def effective_reliability(confidence, accuracy, threshold: float, c: float = 1.0) -> float:
    """Phi_c when the questions with confidence >= threshold are answered."""
    conf, acc = _check(confidence, accuracy)
    return float(np.where(conf >= threshold, _payoffs(acc, c), 0.0).mean())


def best_effective_reliability(confidence, accuracy, c: float = 1.0) -> tuple[float, float]:
    """(Phi_c, threshold): the largest Phi_c over all thresholds, at the lowest threshold that
    reaches it (the most questions answered), as reliable_vqa chooses it. Abstaining on
    everything (Phi_c = 0) counts, at `abstain_all_threshold`."""
    conf, acc = _check(confidence, accuracy)
    thresholds, _, totals = _groups(conf, _payoffs(acc, c))
    phis = np.append(totals / len(conf), 0.0)  # the last entry: abstain on everything
    thresholds = np.append(thresholds, abstain_all_threshold(conf))
    # Among equal maxima the lowest threshold; abstaining (last) only when strictly best.
    best = int(np.flatnonzero(phis[:-1] == phis.max())[-1]) if phis[:-1].max() >= 0 else len(phis) - 1
    return float(phis[best]), float(thresholds[best])


def _answered(conf: np.ndarray, acc: np.ndarray, threshold: float) -> tuple[float, float]:
    """(coverage, risk) at a threshold; risk 0 when nothing is answered."""
    answered = conf >= threshold
    coverage = float(answered.mean())
    return coverage, (float(1.0 - acc[answered].mean()) if answered.any() else 0.0)


def _percent(value: float) -> float:
    return round(100.0 * value, 2)


def summary(confidence, accuracy, validation: tuple | None = None) -> dict:
    """Abstention figures for metrics.json, in percent (2 decimals); thresholds as they are.

    `validation`: optional (confidence, accuracy) of the validation split. When given, each
    Phi_c threshold is chosen there and applied here (the paper's protocol); otherwise it
    is the best threshold on these questions themselves (an upper bound).
    """
    conf, acc = _check(confidence, accuracy)
    out = {"questions": len(conf), "accuracy": _percent(acc.mean()), "aurc": _percent(aurc(conf, acc)),
           "coverage_at_risk": {}, "effective_reliability": {},
           "thresholds_from": "validation" if validation is not None else "these questions (best possible)"}
    for target in SUMMARY_RISKS:
        threshold = choose_threshold(conf, acc, target)
        out["coverage_at_risk"][f"{_percent(target):g}%"] = {
            "coverage": _percent(coverage_at_risk(conf, acc, target)), "threshold": threshold}
    for c in SUMMARY_COSTS:
        if validation is not None:
            threshold = best_effective_reliability(*validation, c=c)[1]
        else:
            threshold = best_effective_reliability(conf, acc, c=c)[1]
        coverage, risk = _answered(conf, acc, threshold)
        out["effective_reliability"][f"c={c}"] = {
            "phi": _percent(effective_reliability(conf, acc, threshold, c)), "threshold": threshold,
            "coverage": _percent(coverage), "risk": _percent(risk),
            "phi_answering_all": _percent(float(_payoffs(acc, c).mean()))}
    return out


def plot_risk_coverage(curves: dict, path: str | Path, title: str = "Risk-coverage") -> Path:
    """A PNG of risk against coverage, one line per model: {name: (coverage, risk[, thresholds])}."""
    from ..plots import pyplot

    plt = pyplot()

    if not curves:
        raise ValueError("plot_risk_coverage: no curves to plot")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        coverage, risk = np.asarray(curve[0]), np.asarray(curve[1])
        ax.plot(100 * coverage, 100 * risk, label=str(name), linewidth=1.5)
    for target in SUMMARY_RISKS:
        ax.axhline(100 * target, color="gray", linestyle=":", linewidth=1)
    ax.set(xlim=(0, 100), ylim=(0, None), xlabel="coverage (% of questions answered)",
           ylabel="risk (% error on answered questions)", title=title)
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
