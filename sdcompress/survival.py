"""Survival rules and per-block survival statistics for stochastic depth.

Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth", arXiv:1603.09382) skips each
residual block l of a mini-batch with probability 1 - p_l. The survival schedule is written once, here:

    linear:  p_l = 1 - (l + 1) / L * (1 - p_last)    (blocks numbered 0..L-1, so block L-1 has p_last)
    uniform: p_l = p_last
    none:    p_l = 1                                  (constant depth, the control)

Because every training step drops a random subset of blocks, training is a randomized experiment run for free.
`SurvivalStats` records, per block, how often it ran, how much its residual branch contributes when it runs
(||f(x)|| / ||x||), and its drop effect: the rise in training loss when it is missing, estimated by least
squares of the per-step loss on the step's drop indicators plus a polynomial trend in the step number (the
loss falls while training), with a standard error from the same fit.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

SURVIVAL_RULES = ("linear", "uniform", "none")


def survival_probs(rule: str, num_blocks: int, p_last: float) -> list[float]:
    """Survival probability p_l of every block under a rule.

    Args:
        rule: "linear", "uniform" or "none".
        num_blocks: L, the number of residual blocks.
        p_last: p_L, the survival probability of the last block (linear) or of every block (uniform).

    Returns:
        A list of L probabilities, block 0 first.
    """
    if rule not in SURVIVAL_RULES:
        raise ValueError(f"unknown survival rule {rule!r}; choose one of {', '.join(SURVIVAL_RULES)}")
    if not 0.0 < p_last <= 1.0:
        raise ValueError(f"p_last must be in (0, 1], got {p_last}")
    if rule == "none":
        return [1.0] * num_blocks
    if rule == "uniform":
        return [float(p_last)] * num_blocks
    return [1.0 - (l + 1) / num_blocks * (1.0 - p_last) for l in range(num_blocks)]


def draw_run_mask(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One Bernoulli draw per block for one mini-batch: True where the block runs."""
    return torch.rand(probs.shape, generator=generator) < probs


@dataclass
class DropEffect:
    """Least-squares drop effect of each block: loss increase when missing, with standard error."""

    effect: list[float]
    stderr: list[float]
    steps: int


def fit_drop_effect(dropped: np.ndarray, loss: np.ndarray, step: np.ndarray, trend_degree: int = 2) -> DropEffect:
    """Regress per-step loss on drop indicators plus a polynomial trend in the step number.

    Args:
        dropped: (T, L) array, 1 where block l was dropped at step t.
        loss: (T,) training loss of each step.
        step: (T,) global step numbers (for the trend term).
        trend_degree: degree of the polynomial trend (the loss falls during training, and not linearly).

    Returns:
        Per-block effect and standard error; NaN for blocks that never or always dropped in the window.
    """
    dropped = np.asarray(dropped, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    t_steps, num_blocks = dropped.shape
    varies = dropped.std(axis=0) > 0
    effect = np.full(num_blocks, np.nan)
    stderr = np.full(num_blocks, np.nan)
    if t_steps == 0:
        return DropEffect(effect.tolist(), stderr.tolist(), 0)
    s = np.asarray(step, dtype=np.float64)
    s = (s - s.mean()) / (s.std() + 1e-12)
    trend = np.stack([s**k for k in range(trend_degree + 1)], axis=1)  # includes the intercept
    x = np.concatenate([trend, dropped[:, varies]], axis=1)
    dof = t_steps - x.shape[1]
    if dof <= 0:
        return DropEffect(effect.tolist(), stderr.tolist(), t_steps)
    coef, *_ = np.linalg.lstsq(x, loss, rcond=None)
    resid = loss - x @ coef
    sigma2 = float(resid @ resid) / dof
    cov = sigma2 * np.linalg.pinv(x.T @ x)
    k = trend.shape[1]
    effect[varies] = coef[k:]
    stderr[varies] = np.sqrt(np.clip(np.diag(cov)[k:], 0.0, None))
    return DropEffect(effect.tolist(), stderr.tolist(), t_steps)


class SurvivalStats:
    """Per-block survival statistics gathered during training.

    The one statistics table of training: `sdcompress train` keeps it for the project's networks (with a window
    and contributions), `sdcompress.train_stochastic_depth` for any module (every step, no window).

    Args:
        probs: scheduled survival probability of each block.
        window: how many recent steps the drop-effect regression uses (None: all of them).
    """

    def __init__(self, probs: list[float], window: int | None = 2000):
        self.probs = list(probs)
        self.window = window
        n = len(probs)
        self.steps = 0
        self.runs = [0] * n
        self.contrib_sum = [0.0] * n
        self.contrib_count = [0] * n
        self._dropped: deque[np.ndarray] = deque(maxlen=window)
        self._loss: deque[float] = deque(maxlen=window)
        self._step: deque[int] = deque(maxlen=window)
        self.drop_effect: DropEffect | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.probs)

    def record(self, run_mask: np.ndarray, loss: float, contrib: dict[int, float] | None = None) -> None:
        """Record one training step: which blocks ran, the step's loss, and the contributions measured."""
        run_mask = np.asarray(run_mask, dtype=bool)
        for l in np.flatnonzero(run_mask):
            self.runs[l] += 1
        for l, c in (contrib or {}).items():
            if math.isfinite(c):
                self.contrib_sum[l] += c
                self.contrib_count[l] += 1
        self._dropped.append((~run_mask).astype(np.uint8))
        self._loss.append(float(loss))
        self._step.append(self.steps)
        self.steps += 1

    def dropped(self) -> np.ndarray:
        """The drop indicators of the steps in the window, (steps, blocks), 1 where a block was dropped."""
        return np.stack(self._dropped) if self._dropped else np.zeros((0, self.num_blocks), dtype=np.uint8)

    def refresh(self) -> DropEffect:
        """Re-fit the drop-effect regression on the current window (done once per epoch)."""
        if not self._loss:
            self.drop_effect = DropEffect([math.nan] * self.num_blocks, [math.nan] * self.num_blocks, 0)
        else:
            self.drop_effect = fit_drop_effect(self.dropped(), np.array(self._loss), np.array(self._step))
        return self.drop_effect

    def to_dict(self) -> dict:
        """The per-block table, as saved in a checkpoint sidecar (JSON-safe: NaN becomes null)."""
        eff = self.drop_effect or DropEffect([math.nan] * self.num_blocks, [math.nan] * self.num_blocks, 0)
        blocks = []
        for l in range(self.num_blocks):
            blocks.append(
                {
                    "block": l,
                    "p_scheduled": round(self.probs[l], 6),
                    "runs": self.runs[l],
                    "survival_rate": self.runs[l] / self.steps if self.steps else None,
                    "contribution": self.contrib_sum[l] / self.contrib_count[l] if self.contrib_count[l] else None,
                    "drop_effect": _finite_or_none(eff.effect[l]),
                    "drop_effect_se": _finite_or_none(eff.stderr[l]),
                }
            )
        return {"steps": self.steps, "window": self.window, "regression_steps": eff.steps, "blocks": blocks}

    def state_dict(self) -> dict:
        """Everything needed to resume, including the regression window."""
        return {
            "summary": self.to_dict(),
            "contrib_sum": list(self.contrib_sum),
            "contrib_count": list(self.contrib_count),
            "window_dropped": torch.from_numpy(self.dropped()),  # tensors: a long window stays compact (lists are read too)
            "window_loss": torch.tensor(list(self._loss), dtype=torch.float64),
            "window_step": torch.tensor(list(self._step), dtype=torch.int64),
        }

    def load_state_dict(self, state: dict) -> None:
        summary = state["summary"]
        self.steps = summary["steps"]
        self.runs = [b["runs"] for b in summary["blocks"]]
        self.contrib_sum = list(state["contrib_sum"])
        self.contrib_count = list(state["contrib_count"])
        rows = state["window_dropped"]
        rows = rows.numpy() if torch.is_tensor(rows) else rows
        self._dropped = deque((np.array(r, dtype=np.uint8) for r in rows), maxlen=self.window)
        self._loss = deque(_plain(state["window_loss"]), maxlen=self.window)
        self._step = deque(_plain(state["window_step"]), maxlen=self.window)
        self.refresh()


def _plain(values) -> list:
    """A saved column as Python numbers (a tensor, or a list from files written before tensors)."""
    return values.tolist() if torch.is_tensor(values) else list(values)


def _finite_or_none(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None
