"""The 1-D half of the staircase reproduction (5 seeds × 2 conditions × 3000 steps).

Reference (``dimscope staircase``, this machine, seeds 0–4): without pre-training 3 of 5 seeds sit on a
plateau (loss ≈ 5.5e-2, the sin(16πx) component unlearnt) for all 3000 steps; with the structured
first layer every seed reaches loss ≤ 1e-3·mean(f²) in about 380–450 steps and ends near 1.4e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from dimscope.staircase import run_staircase


@pytest.mark.slow
def test_staircase_1d_reproduction(tmp_path):
    out = run_staircase(tmp_path / "run", seeds=5, targets=["1d"], workers=2)
    s = out["summary"].set_index("condition")
    runs = out["runs"]
    # pre-training raised the first hidden layer's ε-rank at step 0
    first = runs.groupby("condition")["first_layer_eps_rank_init"]
    assert first.max()["plain"] <= 8 and first.min()["pretrained"] >= 40
    # steps to target: every pretrained seed reaches it, and well before the plain median
    assert s.loc["pretrained", "reached"] == 5
    assert s.loc["pretrained", "steps_to_target_max"] < 1000
    plain_med = np.inf if s.loc["plain", "median_censored"] else s.loc["plain", "steps_to_target_median"]
    assert s.loc["pretrained", "steps_to_target_median"] < 0.5 * plain_med
    # final loss: at least 10x lower with pre-training (median over seeds)
    assert s.loc["pretrained", "final_loss_median"] < 0.1 * s.loc["plain", "final_loss_median"]
    # staircase without pre-training: drops exist and most coincide with a terminal-layer ε-rank step
    assert s.loc["plain", "loss_drops"] >= 5
    assert s.loc["plain", "share"] >= 0.6
    # ordering without pre-training: later hidden layers have higher ε-rank nearly always
    order = out["ordering"]
    assert order[order["condition"] == "plain"]["share_ordered"].median() >= 0.8
