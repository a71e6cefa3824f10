import numpy as np
import pytest
import torch

from sdcompress.survival import SurvivalStats, draw_run_mask, fit_drop_effect, survival_probs


def test_linear_rule_at_both_ends():
    p = survival_probs("linear", 27, 0.5)
    assert len(p) == 27
    assert p[0] == pytest.approx(1 - 1 / 27 * 0.5)
    assert p[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(p, p[1:]))


def test_uniform_and_none_rules():
    assert survival_probs("uniform", 9, 0.8) == [0.8] * 9
    assert survival_probs("none", 9, 0.5) == [1.0] * 9
    assert survival_probs("linear", 9, 1.0) == [1.0] * 9


@pytest.mark.parametrize("p_last", [0.0, -0.1, 1.01])
def test_p_last_out_of_range(p_last):
    with pytest.raises(ValueError, match="p_last"):
        survival_probs("linear", 9, p_last)


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown survival rule"):
        survival_probs("exponential", 9, 0.5)


def test_measured_drop_rate_matches_schedule():
    probs = torch.tensor(survival_probs("linear", 27, 0.5))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([draw_run_mask(probs, g) for _ in range(4000)]).float()
    assert (draws.mean(0) - probs).abs().max() < 0.03


def test_draws_are_seeded():
    probs = torch.full((10,), 0.5)
    a = [draw_run_mask(probs, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(a[0], a[1])


def test_regression_recovers_planted_effects():
    """Loss = falling trend + planted per-block drop effects + noise; the fit finds the effects."""
    rng = np.random.default_rng(0)
    t_steps, probs = 3000, np.array(survival_probs("linear", 12, 0.5))
    planted = np.linspace(0.0, 0.3, 12)[::-1].copy()
    planted[5] = 0.0
    dropped = (rng.random((t_steps, 12)) > probs).astype(np.uint8)
    step = np.arange(t_steps)
    trend = 2.0 * np.exp(-step / 800) + 0.3
    loss = trend + dropped @ planted + rng.normal(0, 0.05, t_steps)
    fit = fit_drop_effect(dropped, loss, step)
    eff, se = np.array(fit.effect), np.array(fit.stderr)
    assert np.isnan(eff[0]) or abs(eff[0] - planted[0]) < 4 * se[0]  # block 0 rarely drops
    ok = np.abs(eff[1:] - planted[1:]) < np.maximum(4 * se[1:], 0.02)
    assert ok.all(), (eff, planted, se)
    assert (se[1:] > 0).all() and (se[1:] < 0.05).all()
    # the ranking that pruning uses is right where the planted effects differ clearly
    assert eff[11] < eff[1]


def test_never_dropped_blocks_have_no_effect_estimate():
    dropped = np.zeros((200, 3), dtype=np.uint8)
    dropped[::2, 2] = 1
    fit = fit_drop_effect(dropped, np.random.default_rng(0).normal(size=200), np.arange(200))
    assert np.isnan(fit.effect[0]) and np.isnan(fit.effect[1]) and np.isfinite(fit.effect[2])


def test_stats_record_and_round_trip():
    s = SurvivalStats([1.0, 0.5], window=100)
    rng = np.random.default_rng(1)
    for i in range(150):
        keep = np.array([True, rng.random() < 0.5])
        s.record(keep, 1.0 + 0.2 * (not keep[1]) + rng.normal(0, 0.01), {0: 0.5, 1: 0.25} if keep[1] else {0: 0.5})
    s.refresh()
    d = s.to_dict()
    assert d["steps"] == 150 and d["regression_steps"] == 100
    assert d["blocks"][0]["survival_rate"] == 1.0 and d["blocks"][1]["runs"] == s.runs[1]
    assert d["blocks"][1]["contribution"] == pytest.approx(0.25)
    assert d["blocks"][1]["drop_effect"] == pytest.approx(0.2, abs=0.02)
    t = SurvivalStats([1.0, 0.5], window=100)
    t.load_state_dict(s.state_dict())
    assert t.to_dict() == d
