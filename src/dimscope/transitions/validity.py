"""The validity harness: does a detector find planted changes and stay silent on nulls?

``validate(detector, fixtures=None) -> ValidityReport``. For every fixture and every replicate the
detector is fitted afresh and its predicted steps are matched one-to-one (greedily, in time order)
to the true change steps within the fixture's tolerance.

* recall (positive fixture) = matched true changes / true changes, over replicates;
* false positives per 1000 steps (every fixture) = unmatched detections × 1000 / steps covered,
  over replicates;
* verdict: **VALID** iff the mean recall over positive fixtures ≥ ``min_recall`` (0.75) and every
  null has ≤ ``max_fp_per_1000`` (2) false positives per 1000 steps — ndtracker 2.0's rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._validation import check_float
from .detectors import BaseDetector
from .fixtures import Fixture, standard_battery

__all__ = ["FixtureResult", "ValidityReport", "validate", "match"]


def match(detected: Sequence[int], truth: Sequence[int], tolerance: int) -> tuple[int, int, int]:
    """Greedy one-to-one matching within ``tolerance`` steps: (true pos., false pos., false neg.).

    Detections are taken in time order; each takes the nearest still-unmatched true change within
    the tolerance.
    """
    left = sorted(int(t) for t in truth)
    tp = fp = 0
    for d in sorted(int(x) for x in detected):
        cands = [t for t in left if abs(d - t) <= tolerance]
        if cands:
            best = min(cands, key=lambda t: abs(d - t))
            left.remove(best)
            tp += 1
        else:
            fp += 1
    return tp, fp, len(left)


@dataclass
class FixtureResult:
    """One fixture's outcome over its replicates."""

    name: str
    kind: str
    replicates: int
    n_steps: int
    n_truth: int
    true_positives: int
    false_positives: int
    false_negatives: int
    detected: list[list[int]] = field(default_factory=list)
    description: str = ""

    @property
    def recall(self) -> float | None:
        if self.kind == "null":
            return None
        return self.true_positives / max(1, self.n_truth * self.replicates)

    @property
    def fp_per_1000(self) -> float:
        return 1000.0 * self.false_positives / max(1, self.n_steps * self.replicates)


@dataclass
class ValidityReport:
    """The harness's verdict on one detector (see the module docstring for the rule)."""

    detector: str
    params: dict[str, Any]
    results: list[FixtureResult]
    min_recall: float = 0.75
    max_fp_per_1000: float = 2.0

    @property
    def mean_recall(self) -> float:
        r = [x.recall for x in self.results if x.recall is not None]
        return float(np.mean(r)) if r else float("nan")

    @property
    def worst_null_fp_per_1000(self) -> float:
        r = [x.fp_per_1000 for x in self.results if x.kind == "null"]
        return float(max(r)) if r else 0.0

    @property
    def valid(self) -> bool:
        mr = self.mean_recall
        return bool(np.isfinite(mr) and mr >= self.min_recall and self.worst_null_fp_per_1000 <= self.max_fp_per_1000)

    @property
    def verdict(self) -> str:
        return "VALID" if self.valid else "NOT VALID"

    def failing(self) -> list[str]:
        """Names of the nulls over the false-positive bar."""
        return [x.name for x in self.results if x.kind == "null" and x.fp_per_1000 > self.max_fp_per_1000]

    def to_dict(self) -> dict[str, Any]:
        """The ``transitions/validity`` artifact (data contract)."""
        return {
            "detector": self.detector,
            "params": self.params,
            "fixtures": [
                {
                    "name": x.name,
                    "kind": x.kind,
                    "recall": x.recall,
                    "fp_per_1000": x.fp_per_1000,
                    "replicates": x.replicates,
                    "description": x.description,
                }
                for x in self.results
            ],
            "mean_recall": self.mean_recall,
            "worst_null_fp_per_1000": self.worst_null_fp_per_1000,
            "min_recall": self.min_recall,
            "max_fp_per_1000": self.max_fp_per_1000,
            "verdict": self.verdict,
        }

    def render(self) -> str:
        """A plain-text table: one line per fixture, then the rule and the verdict."""
        lines = [f"Validity of {self.detector}", ""]
        lines.append(f"  {'fixture':<20} {'kind':<8} {'reps':>4} {'recall':>7} {'FP/1000':>8}  description")
        for x in self.results:
            rec = "-" if x.recall is None else f"{x.recall:.2f}"
            flag = " <-- over the bar" if x.kind == "null" and x.fp_per_1000 > self.max_fp_per_1000 else ""
            lines.append(f"  {x.name:<20} {x.kind:<8} {x.replicates:>4} {rec:>7} {x.fp_per_1000:>8.2f}  {x.description}{flag}")
        lines += [
            "",
            f"  mean recall on positive fixtures : {self.mean_recall:.3f}  (need >= {self.min_recall})",
            f"  worst null false positives/1000  : {self.worst_null_fp_per_1000:.2f}  (need <= {self.max_fp_per_1000} on every null)",
            f"  VERDICT: {self.verdict}",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.render()


def validate(
    detector: BaseDetector,
    fixtures: Sequence[Fixture] | None = None,
    *,
    min_recall: float = 0.75,
    max_fp_per_1000: float = 2.0,
) -> ValidityReport:
    """Run ``detector`` on every replicate of every fixture (default :func:`standard_battery`)."""
    if not hasattr(detector, "fit") or not hasattr(detector, "predict"):
        raise TypeError(f"The 'detector' parameter of validate must have fit(values, steps) and predict(). Got {type(detector).__name__}.")
    check_float(min_recall, "min_recall", low=0.0, high=1.0, owner="validate")
    check_float(max_fp_per_1000, "max_fp_per_1000", low=0.0, owner="validate")
    fixtures = list(fixtures) if fixtures is not None else standard_battery()
    results = []
    for fx in fixtures:
        if not isinstance(fx, Fixture):
            raise TypeError(f"The 'fixtures' parameter of validate must hold Fixture objects. Got {type(fx).__name__}.")
        tp = fp = fn = 0
        detected = []
        for row in fx.values:
            d = detector.fit(row, fx.steps).predict()
            detected.append(list(d))
            a, b, c = match(d, fx.truth, fx.tolerance)
            tp, fp, fn = tp + a, fp + b, fn + c
        results.append(
            FixtureResult(fx.name, fx.kind, len(fx.values), fx.n_steps, len(fx.truth), tp, fp, fn, detected, fx.description)
        )
    params = detector.get_params() if hasattr(detector, "get_params") else {}
    name = getattr(detector, "name", type(detector).__name__)
    return ValidityReport(str(name), dict(params), results, min_recall, max_fp_per_1000)
