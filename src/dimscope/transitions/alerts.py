"""Live alerts while training runs: a :class:`~dimscope.TrackerExtension`.

``Alerts(metric="stable_rank", check_every=10, callback=None)`` keeps, per tracked layer, the
history of one metric (the Tracker's primary convention) and of the loss, and every
``check_every`` measurements evaluates four rules on it:

``collapse``
    the metric falls below ``collapse_fraction`` (0.5) × its running maximum. Fires once, re-arms
    when the metric climbs back above that level.
``stalled_expansion``
    over the last ``window`` steps the metric has not grown (its maximum there is within
    ``stall_tol`` (1%) of its value at the window's start) while the loss fell by more than
    ``loss_drop`` (10%). The network keeps learning without using more dimensions.
``instability``
    the variance of the metric's last ``var_window`` (10) increments exceeds ``var_factor`` (10) ×
    the variance of the ``var_window`` increments before them.
``early_saturation``
    the first tracked layer has stalled at its running maximum (stalled as above, and within
    ``stall_tol`` of the maximum) while the last tracked layer is not expanding either (no
    growth over the window) and the loss still falls.

Each alert is logged on the ``dimscope.alerts`` logger, stored as an event of kind ``"alert"``
(payload ``{"alert", "message"}``), kept in :attr:`Alerts.alerts`, and passed to ``callback`` on
the training thread (via ``tracker.call_soon``, so the callback may touch the model or stop
training). A rule that fired for a layer stays quiet for ``window`` steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._validation import check_float, check_int
from ..tracker import Tracker, TrackerExtension

__all__ = ["Alert", "Alerts"]

log = logging.getLogger("dimscope.alerts")


@dataclass
class Alert:
    """One alert: the rule, the step, the layer and metric it concerns, a readable message."""

    alert: str
    step: int
    layer: str
    metric: str
    message: str


class Alerts(TrackerExtension):
    """Evaluate the alert rules every ``check_every`` measurements (see the module docstring)."""

    name = "alerts"

    def __init__(
        self,
        metric: str = "stable_rank",
        check_every: int = 10,
        callback: Callable[[Alert], Any] | None = None,
        *,
        collapse_fraction: float = 0.5,
        window: int = 500,
        stall_tol: float = 0.01,
        loss_drop: float = 0.1,
        var_window: int = 10,
        var_factor: float = 10.0,
    ) -> None:
        self.metric = metric
        self.check_every = check_int(check_every, "check_every", min_value=1, owner="Alerts")
        self.callback = callback
        self.collapse_fraction = check_float(collapse_fraction, "collapse_fraction", low=0.0, high=1.0, owner="Alerts")
        self.window = check_int(window, "window", min_value=1, owner="Alerts")
        self.stall_tol = check_float(stall_tol, "stall_tol", low=0.0, owner="Alerts")
        self.loss_drop = check_float(loss_drop, "loss_drop", low=0.0, high=1.0, owner="Alerts")
        self.var_window = check_int(var_window, "var_window", min_value=3, owner="Alerts")
        self.var_factor = check_float(var_factor, "var_factor", low=1.0, owner="Alerts")
        self.alerts: list[Alert] = []
        self._hist: dict[str, list[tuple[int, float]]] = {}
        self._loss: list[tuple[int, float]] = []
        self._armed_collapse: dict[str, bool] = {}
        self._last_fired: dict[tuple[str, str], int] = {}
        self._n = 0
        self._layers: list[str] = []

    def setup(self, tracker: Tracker) -> None:
        self._layers = list(tracker.layers)

    # -- the rules, on plain histories (usable without a Tracker) ---------------------------------
    def _window_stats(self, hist: list[tuple[int, float]], step: int) -> tuple[float, float, float] | None:
        past = [(s, v) for s, v in hist if s >= step - self.window]
        if len(past) < 3 or past[0][0] > step - self.window + max(1, self.window // 10):
            return None
        vals = np.array([v for _, v in past])
        return float(vals[0]), float(vals.max()), float(vals[-1])

    def _loss_falling(self, step: int) -> bool:
        st = self._window_stats(self._loss, step)
        if st is None:
            return False
        first, _, last = st
        return first > 0 and (first - last) / abs(first) > self.loss_drop

    def _stalled(self, layer: str, step: int) -> bool:
        st = self._window_stats(self._hist.get(layer, []), step)
        if st is None:
            return False
        first, mx, _ = st
        return mx <= first * (1 + self.stall_tol) + 1e-12

    def evaluate(self, step: int) -> list[Alert]:
        """Run every rule at ``step`` on the histories so far; returns the new alerts."""
        new: list[Alert] = []

        def fire(rule: str, layer: str, message: str) -> None:
            last = self._last_fired.get((rule, layer))
            if rule != "collapse" and last is not None and step - last < self.window:
                return
            self._last_fired[(rule, layer)] = step
            new.append(Alert(rule, int(step), layer, self.metric, message))

        for layer, hist in self._hist.items():
            if not hist:
                continue
            vals = np.array([v for _, v in hist])
            cur, peak = vals[-1], float(np.nanmax(vals))
            armed = self._armed_collapse.get(layer, True)
            if armed and peak > 0 and cur < self.collapse_fraction * peak:
                fire("collapse", layer, f"{self.metric} of {layer} fell to {cur:.4g}, below {self.collapse_fraction:g} x its running max {peak:.4g}")
                self._armed_collapse[layer] = False
            elif not armed and cur >= self.collapse_fraction * peak:
                self._armed_collapse[layer] = True
            if self._stalled(layer, step) and self._loss_falling(step):
                fire("stalled_expansion", layer, f"{self.metric} of {layer} has not grown for {self.window} steps while the loss fell by more than {self.loss_drop:.0%}")
            w = self.var_window
            if len(vals) >= 2 * w + 1:
                d = np.diff(vals[-(2 * w + 1) :])
                before, after = np.var(d[:w]), np.var(d[w:])
                if after > self.var_factor * max(before, 1e-300) and after > 0:
                    fire("instability", layer, f"the variance of {self.metric} increments in {layer} rose {after / max(before, 1e-300):.3g}x over the last {w} measurements")
        layers = [lay for lay in (self._layers or list(self._hist)) if self._hist.get(lay)]
        if len(layers) >= 2:
            first, last = layers[0], layers[-1]
            vals = [v for _, v in self._hist[first]]
            at_max = vals[-1] >= (1 - self.stall_tol) * max(vals)
            if self._stalled(first, step) and at_max and self._stalled(last, step) and self._loss_falling(step):
                fire("early_saturation", first, f"early layer {first} is saturated at its maximum {self.metric} while the last layer {last} does not expand and the loss still falls")
        self.alerts.extend(new)
        return new

    def observe(self, step: int, values: dict[tuple[str, str], float]) -> list[Alert]:
        """Record one measurement's values (``(layer, metric) -> value``, loss as ``("", "loss")``);
        evaluate the rules every ``check_every`` calls."""
        for (layer, metric), v in values.items():
            if metric == self.metric and layer and np.isfinite(v):
                self._hist.setdefault(layer, []).append((int(step), float(v)))
        if ("", "loss") in values and np.isfinite(values[("", "loss")]):
            self._loss.append((int(step), float(values[("", "loss")])))
        self._n += 1
        if self._n % self.check_every:
            return []
        return self.evaluate(step)

    # -- Tracker hooks ----------------------------------------------------------------------------
    def on_metrics(self, tracker: Tracker, step: int, values: dict[tuple[str, str], float]) -> None:
        for a in self.observe(step, values):
            log.warning("dimscope alert [%s] step %d: %s", a.alert, a.step, a.message)
            if tracker.store is not None:
                tracker.store.add_event(a.step, "alert", layer=a.layer, metric=a.metric, payload={"alert": a.alert, "message": a.message})
            if self.callback is not None:
                cb, alert = self.callback, a
                tracker.call_soon(lambda cb=cb, alert=alert: cb(alert))
