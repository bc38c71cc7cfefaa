"""ECE against independent facts: closed-form cases, a calibrated sampler, and scikit-learn's per-bin means."""

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from multitune.scoring.calibration import expected_calibration_error, reliability


def test_constant_overconfidence_is_the_gap():
    # always 90% sure, right half the time: one bin, |0.5 - 0.9|
    conf = [0.9] * 10
    correct = [True, False] * 5
    assert expected_calibration_error(conf, correct) == pytest.approx(0.4)


def test_a_calibrated_sampler_has_near_zero_error():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 200_000)
    correct = rng.uniform(0, 1, conf.size) < conf  # right with exactly the stated probability
    assert expected_calibration_error(conf, correct) < 0.01
    # and a scorer that claims certainty on the same outcomes is off by about one half
    assert expected_calibration_error(np.ones_like(conf), correct) == pytest.approx(1 - correct.mean(), abs=1e-9)


def test_bins_match_scikit_learn():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0, 1, 5_000) ** 2
    correct = rng.uniform(0, 1, conf.size) < np.sqrt(conf)
    table = reliability(conf, correct, bins=10)
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=10, strategy="uniform")
    np.testing.assert_allclose([b["accuracy"] for b in table], prob_true, atol=1e-12)
    np.testing.assert_allclose([b["confidence"] for b in table], prob_pred, atol=1e-12)
    counts, _ = np.histogram(conf, bins=np.linspace(0, 1, 11))
    assert [b["n"] for b in table] == [int(c) for c in counts if c]
    expected = sum(c / conf.size * abs(t - p) for c, t, p in zip([c for c in counts if c], prob_true, prob_pred, strict=True))
    assert expected_calibration_error(conf, correct, bins=10) == pytest.approx(expected, abs=1e-12)
