"""Production monitoring: turn ``"alert"`` events into a log line and, if asked, a stop.

:class:`StopOnAlert` is a :class:`dimscope.TrackerExtension` that does not detect anything itself.
Whatever raises alerts (the transitions area's live alert extension, or your own) writes events of
kind ``"alert"`` (payload ``{"alert": name, "message": text}``) to the run; :class:`StopOnAlert`
picks them up and, on the training thread, logs them, calls your ``on_alert(event)`` and — once
``stop_after`` matching alerts have arrived — sets :attr:`StopOnAlert.should_stop` (your loop checks
it) and ``trainer.should_stop = True`` when a Lightning ``trainer`` is given. Beside a
``DistributedTracker`` (extensions run on rank 0), build a StopOnAlert on every rank, as the tracker
itself: rank 0's stop then reaches every rank's copy and trainer at the same step (one int is
all-reduced per step), so no rank trains on into a collective the others have left.

Two ways alerts reach it:

* **pushed**: the alert producer calls :meth:`StopOnAlert.notify` (no latency);
* **polled**: at the start of a training step (at most every ``poll_seconds``) it reads the new
  committed ``"alert"`` events of the run with its own reader connection, on the training thread. An
  alert is seen once the store has committed it: at most the store's commit policy later
  (``commit_every`` measurements / ``commit_seconds``); with ``commit_every=1`` and
  ``background=False``, at the step right after the measurement that raised it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .._validation import check_float, check_int
from ..tracker import Tracker, TrackerExtension

__all__ = ["StopOnAlert"]

log = logging.getLogger("dimscope.monitor")


class StopOnAlert(TrackerExtension):
    """Log alerts and request a stop after ``stop_after`` of them (module docstring).

    Parameters
    ----------
    alerts:
        Alert names (``payload["alert"]``) that count; None counts every alert.
    stop_after:
        How many matching alerts request a stop; 0 only logs.
    on_alert:
        ``on_alert(event)`` called on the training thread for each matching alert; ``event`` is a
        dict with step, layer, metric, payload.
    trainer:
        An object with a ``should_stop`` attribute (Lightning's ``Trainer``), set to True on stop.
    poll:
        Read alert events from the run (needs a Tracker with a run directory).
    poll_seconds:
        The least time between two reads of the run.
    """

    name = "stop_on_alert"
    #: beside a DistributedTracker (extensions run on rank 0), a stop is passed to every rank's copy
    syncs_stop = True

    def __init__(
        self,
        alerts: Iterable[str] | None = None,
        *,
        stop_after: int = 1,
        on_alert: Callable[[dict[str, Any]], None] | None = None,
        trainer: Any = None,
        poll: bool = True,
        poll_seconds: float = 1.0,
    ) -> None:
        self.alerts = alerts
        self.alerts_ = None if alerts is None else set(alerts)  # also on a DistributedTracker's ranks > 0 (no setup)
        self.stop_after = stop_after
        self.on_alert = on_alert
        self.trainer = trainer
        self.poll = poll
        self.poll_seconds = poll_seconds
        self._last_poll = float("-inf")
        self.should_stop = False
        self.seen: list[dict[str, Any]] = []
        self._last_id = 0
        self._reader: Any = None
        self._lock = threading.Lock()
        self._tracker: Tracker | None = None

    def setup(self, tracker: Tracker) -> None:
        check_int(self.stop_after, "stop_after", min_value=0, owner="StopOnAlert")
        check_float(self.poll_seconds, "poll_seconds", low=0.0, owner="StopOnAlert")
        self.alerts_ = None if self.alerts is None else set(self.alerts)
        self._tracker = tracker
        if self.poll and tracker.store is not None:
            from ..store import Run

            tracker.store.commit()
            self._reader = Run(tracker.store.db_path)
            ev = self._reader.events("alert")
            self._last_id = int(ev["id"].max()) if len(ev) else 0  # alerts of earlier sessions do not count

    def notify(self, event: Mapping[str, Any], *, on_training_thread: bool = False) -> None:
        """Push one alert event (dict with step, layer, metric, payload); thread-safe.

        Logging, ``on_alert`` and the stop run on the training thread (at the next step) unless
        ``on_training_thread`` says the caller already is there.
        """
        ev = {k: event.get(k) for k in ("step", "layer", "metric")}
        ev["payload"] = dict(event.get("payload") or {})
        name = ev["payload"].get("alert")
        if self.alerts_ is not None and name not in self.alerts_:
            return
        with self._lock:
            self.seen.append(ev)
            stop = self.stop_after > 0 and len(self.seen) >= self.stop_after
        if self._tracker is not None and not on_training_thread:
            self._tracker.call_soon(lambda: self._handle(ev, stop))
        else:
            self._handle(ev, stop)

    def _handle(self, ev: dict[str, Any], stop: bool) -> None:
        log.warning("dimscope alert at step %s (%s %s): %s", ev.get("step"), ev.get("layer"), ev.get("metric"), ev["payload"].get("message", ev["payload"]))
        if self.on_alert is not None:
            self.on_alert(ev)
        if stop and not self.should_stop:
            self.stop()
            log.warning("dimscope: stopping training after %d alert(s).", len(self.seen))

    def stop(self) -> None:
        """Set :attr:`should_stop` and, when a ``trainer`` is given, ``trainer.should_stop``. A
        DistributedTracker calls it on the other ranks' copies when rank 0's stops."""
        self.should_stop = True
        if self.trainer is not None:
            self.trainer.should_stop = True

    def _poll(self) -> None:
        if self._reader is None:
            return
        self._last_poll = time.monotonic()
        ev = self._reader.events("alert")
        new = ev[ev["id"] > self._last_id]
        for _, row in new.iterrows():
            self._last_id = max(self._last_id, int(row["id"]))
            step = None if row["step"] != row["step"] else int(row["step"])  # NaN → None
            self.notify({"step": step, "layer": row["layer"], "metric": row["metric"], "payload": row["payload"]}, on_training_thread=True)

    def on_step(self, tracker: Tracker, step: int, measuring: bool) -> None:
        if self._reader is not None and time.monotonic() - self._last_poll >= self.poll_seconds:
            self._poll()

    def close(self, tracker: Tracker) -> None:
        if self._reader is not None:
            self._poll()
            self._reader.close()
            self._reader = None
