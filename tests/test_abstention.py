"""vqa/reliability/abstention.py: risk-coverage, coverage at risk, AURC and effective reliability."""

import subprocess
import sys

import numpy as np
import pytest
from fixtures import ROOT
from PIL import Image

from vqa.reliability.abstention import (abstain_all_threshold, aurc, best_effective_reliability, choose_threshold,
                                        coverage_at_risk, effective_reliability, plot_risk_coverage,
                                        risk_coverage_curve, summary)

# Five questions; two tie at 0.8 (one right, one wrong), one is partly right (0.6).
CONF = [0.3, 0.8, 0.9, 0.5, 0.8]
ACC = [0.0, 1.0, 1.0, 0.6, 0.0]
# By descending confidence, answered sets and their risks:
#   >= 0.9: {1}               coverage 0.2, risk 0
#   >= 0.8: {1, 1, 0}         coverage 0.6, risk 1/3
#   >= 0.5: {1, 1, 0, 0.6}    coverage 0.8, risk 1 - 2.6/4 = 0.35
#   >= 0.3: all               coverage 1.0, risk 1 - 2.6/5 = 0.48


def reference_curve(conf, acc):
    """Every threshold tried one by one: the definition, with no sorting tricks."""
    conf, acc = np.asarray(conf, float), np.asarray(acc, float)
    rows = []
    for t in sorted(set(conf), reverse=True):
        answered = conf >= t
        rows.append((answered.mean(), 1 - acc[answered].mean(), t))
    return [np.array(c) for c in zip(*rows)]


def reference_phi(conf, acc, threshold, c):
    total = 0.0
    for q, a in zip(conf, acc):
        if q >= threshold:
            total += a if a > 0 else -c
    return total / len(conf)


def test_risk_coverage_curve_by_hand():
    coverage, risk, thresholds = risk_coverage_curve(CONF, ACC)
    np.testing.assert_allclose(coverage, [0.2, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(risk, [0.0, 1 / 3, 0.35, 0.48])
    np.testing.assert_array_equal(thresholds, [0.9, 0.8, 0.5, 0.3])


def test_coverage_at_risk_and_choose_threshold_by_hand():
    assert coverage_at_risk(CONF, ACC, 0.0) == pytest.approx(0.2)
    assert coverage_at_risk(CONF, ACC, 0.34) == pytest.approx(0.6)
    assert coverage_at_risk(CONF, ACC, 0.35) == pytest.approx(0.8)  # exactly at the target counts
    assert coverage_at_risk(CONF, ACC, 0.5) == 1.0
    assert choose_threshold(CONF, ACC, 0.0) == 0.9
    assert choose_threshold(CONF, ACC, 0.35) == 0.5
    assert choose_threshold(CONF, ACC, 0.48) == 0.3


def test_aurc_by_hand():
    # Widths 0.2, 0.4 (the tie spans two questions), 0.2, 0.2.
    assert aurc(CONF, ACC) == pytest.approx(0.2 * 0 + 0.4 * (1 / 3) + 0.2 * 0.35 + 0.2 * 0.48)


def test_aurc_against_reliable_vqa_trapezoids():
    # Distinct confidences: reliable_vqa's sklearn.metrics.auc over the per-question points
    # differs from the mean risk by (first risk + last risk) / 2N.
    rng = np.random.default_rng(0)
    conf, acc = rng.random(200), rng.choice([0, 0.3, 0.6, 0.9, 1.0], 200)
    coverage, risk, _ = risk_coverage_curve(conf, acc)
    trapezoids = float(np.sum(np.diff(coverage) * (risk[1:] + risk[:-1]) / 2))
    assert aurc(conf, acc) - trapezoids == pytest.approx((risk[0] + risk[-1]) / (2 * 200))


def test_effective_reliability_by_hand():
    # Answer >= 0.5: 1 + 1 - c + 0.6, over 5 questions; the 0.3 question is abstained on.
    assert effective_reliability(CONF, ACC, 0.5, c=1) == pytest.approx(1.6 / 5)
    assert effective_reliability(CONF, ACC, 0.5, c=10) == pytest.approx(-7.4 / 5)
    assert effective_reliability(CONF, ACC, 0.8, c=1) == pytest.approx(1 / 5)  # the tie is answered together
    assert effective_reliability(CONF, ACC, 0.0, c=1) == pytest.approx(0.6 / 5)
    # c = 1: totals 1, 1, 1.6, 0.6 at thresholds 0.9, 0.8, 0.5, 0.3: best 0.32 at 0.5.
    assert best_effective_reliability(CONF, ACC, c=1) == (pytest.approx(0.32), 0.5)
    # c = 10: totals 1, -8, -7.4, -17.4: only the most confident question is worth answering.
    assert best_effective_reliability(CONF, ACC, c=10) == (pytest.approx(0.2), 0.9)


def test_partly_right_answers_count_their_accuracy_not_the_cost():
    assert effective_reliability([0.9, 0.9], [0.3, 0.0], 0.5, c=10) == pytest.approx((0.3 - 10) / 2)


def test_equal_maxima_choose_the_lowest_threshold():
    # Totals 1, 2, 1, 2: the wrong 0.6 and the right 0.5 cancel; same Phi, more coverage at 0.5.
    phi, threshold = best_effective_reliability([0.9, 0.7, 0.6, 0.5], [1.0, 1.0, 0.0, 1.0], c=1)
    assert (phi, threshold) == (pytest.approx(2 / 4), 0.5)
    # Totals -1, 0: answering both ties with abstaining on both (0); the lower threshold wins.
    phi, threshold = best_effective_reliability([0.9, 0.8], [0.0, 1.0], c=1)
    assert (phi, threshold) == (0.0, 0.8)


def test_all_correct():
    conf, acc = [0.2, 0.9, 0.5], [1.0, 1.0, 1.0]
    assert coverage_at_risk(conf, acc, 0.01) == 1.0
    assert aurc(conf, acc) == 0.0
    assert choose_threshold(conf, acc, 0.01) == 0.2
    assert best_effective_reliability(conf, acc, c=10) == (1.0, 0.2)


def test_all_wrong():
    conf, acc = [0.2, 0.9, 0.5], [0.0, 0.0, 0.0]
    assert coverage_at_risk(conf, acc, 0.05) == 0.0
    assert aurc(conf, acc) == 1.0
    abstain = choose_threshold(conf, acc, 0.05)
    assert abstain > 1.0 and abstain == abstain_all_threshold(conf)
    phi, threshold = best_effective_reliability(conf, acc, c=1)
    assert phi == 0.0 and threshold > 1.0
    assert effective_reliability(conf, acc, threshold, c=1) == 0.0
    assert effective_reliability(conf, acc, 0.0, c=10) == -10.0


def test_ties_are_answered_together():
    conf, acc = [0.8, 0.8], [1.0, 0.0]
    coverage, risk, thresholds = risk_coverage_curve(conf, acc)
    assert coverage.tolist() == [1.0] and risk.tolist() == [0.5] and thresholds.tolist() == [0.8]
    assert coverage_at_risk(conf, acc, 0.0) == 0.0  # the right one cannot be answered alone
    assert choose_threshold(conf, acc, 0.0) > 1.0


def test_against_the_definition_on_random_data_with_ties():
    rng = np.random.default_rng(1)
    conf = np.round(rng.random(300), 2)  # ~100 distinct values: many ties
    acc = np.where(rng.random(300) < conf, rng.choice([0.3, 0.6, 0.9, 1.0], 300), 0.0)
    for got, expected in zip(risk_coverage_curve(conf, acc), reference_curve(conf, acc)):
        np.testing.assert_allclose(got, expected, atol=1e-12)
    for c in (1, 10, 100):
        phi, threshold = best_effective_reliability(conf, acc, c)
        phis = [reference_phi(conf, acc, t, c) for t in np.unique(conf)]
        assert phi == pytest.approx(max(max(phis), 0.0))
        assert effective_reliability(conf, acc, threshold, c) == pytest.approx(phi)


def test_choose_threshold_meets_the_target_on_its_own_data():
    rng = np.random.default_rng(2)
    conf = rng.random(2000)
    acc = np.where(rng.random(2000) < conf ** 0.3, 1.0, 0.0)
    for target in (0.01, 0.05, 0.2):
        threshold = choose_threshold(conf, acc, target)
        answered = conf >= threshold
        assert answered.sum() > 0 and 1 - acc[answered].mean() <= target
        coverage, risk, thresholds = risk_coverage_curve(conf, acc)
        assert (risk[thresholds < threshold] > target).all()  # no lower threshold reaches it
        assert answered.mean() == pytest.approx(coverage_at_risk(conf, acc, target))


def test_float_rounding_does_not_miss_the_target():
    # 99 right and 1 wrong: 1 - 0.99 == 0.010000000000000009 in floats; risk 1 % is met.
    conf, acc = np.linspace(1, 0.5, 100), np.r_[np.ones(99), 0.0]
    assert coverage_at_risk(conf, acc, 0.01) == 1.0


@pytest.mark.parametrize("conf, acc, message", [
    ([], [], "no questions"),
    ([0.5, 0.6], [1.0], "one of each"),
    ([0.5], [1.2], r"\[0, 1\]"),
    ([0.5], [-0.1], r"\[0, 1\]"),
    ([0.5], [float("nan")], r"\[0, 1\]"),
    ([float("nan")], [1.0], "NaN"),
    ([[0.5]], [[1.0]], "1-D"),
])
def test_bad_input_is_refused(conf, acc, message):
    for function in (risk_coverage_curve, aurc, summary):
        with pytest.raises(ValueError, match=message):
            function(conf, acc)
    with pytest.raises(ValueError, match=message):
        best_effective_reliability(conf, acc, c=1)


def test_summary_by_hand():
    out = summary(CONF, ACC)
    assert out["questions"] == 5 and out["accuracy"] == 52.0 and out["aurc"] == 29.93
    assert out["coverage_at_risk"] == {"1%": {"coverage": 20.0, "threshold": 0.9},
                                       "5%": {"coverage": 20.0, "threshold": 0.9}}
    assert out["effective_reliability"]["c=1"] == {"phi": 32.0, "threshold": 0.5, "coverage": 80.0, "risk": 35.0,
                                                   "phi_answering_all": 12.0}
    assert out["effective_reliability"]["c=10"]["phi"] == 20.0
    assert out["effective_reliability"]["c=10"]["phi_answering_all"] == -348.0


def test_summary_takes_phi_thresholds_from_validation():
    # On validation the best c=1 threshold is 0.8; applied here it answers 3 questions.
    out = summary(CONF, ACC, validation=([0.9, 0.8, 0.5], [1.0, 1.0, 0.0]))
    entry = out["effective_reliability"]["c=1"]
    assert entry["threshold"] == 0.8 and entry["coverage"] == 60.0 and entry["phi"] == 20.0
    assert out["thresholds_from"] == "validation"


def test_plot_risk_coverage(tmp_path):
    curves = {"model": risk_coverage_curve(CONF, ACC), "oracle": ([0.5, 1.0], [0.0, 0.48])}
    path = plot_risk_coverage(curves, tmp_path / "rc.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (550, 400)


def test_import_leaves_matplotlib_alone():
    code = "import sys, vqa.reliability.abstention; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
