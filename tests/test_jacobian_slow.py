"""The paper's reproduction (REFERENCE.md section 1): slow, run with DIMSCOPE_SLOW=1."""

from __future__ import annotations

import numpy as np
import pytest

from dimscope.jacobian import PAPER_TRAINING, digits_data, paper_model, training_jacobian
from dimscope.jacobian.experiments import perturbation_linearity, restricted_training


@pytest.mark.slow
def test_paper_reproduction_bulk_share_restricted_training_and_linearity() -> None:
    Xtr, ytr, Xte, yte = digits_data()
    model = paper_model(0)
    tj = training_jacobian(model, Xtr, ytr, **PAPER_TRAINING)
    assert tj.n == 4810 and tj.method == "mlp"
    s = tj.singular_values.double().numpy()
    reg = tj.regions(0.1)
    # REFERENCE: bulk 2984 / 4810 = 62.0 %; the band is +- 6 points
    assert abs(reg.bulk_share - 0.62) <= 0.06, reg.counts
    assert 10 < s[0] < 30  # 20.47 with the authors' init; 15-21 across inits
    al = tj.alignment()
    assert np.median(al[reg.bulk]) > 0.95
    # bulk perturbations are linear over eps 1e-3 .. 1e3
    mid = int(reg.bulk[len(reg.bulk) // 2])
    pt = perturbation_linearity(model, tj, Xtr, ytr, Xte, yte, indices=[mid], eps=(1e-3, 1e-1, 10.0, 1e3))
    assert pt["rel_deviation"].max() < 0.05, pt
    rs = restricted_training(
        model, tj, Xtr, ytr, Xte, yte, settings=[("bulk", 100, False), ("chaotic", 100, False), ("stable", 1000, False)]
    )
    loss = {(r.region, r.k): r.test_loss for r in rs.itertuples()}
    full = loss[("full", 4810)]
    assert full < 0.3
    assert loss[("bulk", 100)] > 2.0  # near chance (log 10 = 2.30); reference 2.49
    assert loss[("chaotic", 100)] < 2 * full + 0.2  # reference 0.22
    assert loss[("stable", 1000)] < 2 * full + 0.2  # reference 0.173
