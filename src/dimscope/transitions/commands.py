"""CLI commands of the transitions area: ``validate-detector`` and ``analyze``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

__all__ = ["register", "parse_params"]


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["window=30", "z=4", "refractory=none"]`` → {"window": 30, "z": 4.0, "refractory": None}."""
    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"The '--param' option must look like name=value. Got {it!r} instead.")
        k, v = it.split("=", 1)
        v = v.strip()
        val: Any
        if v.lower() in ("none", "null"):
            val = None
        else:
            try:
                val = int(v)
            except ValueError:
                try:
                    val = float(v)
                except ValueError:
                    val = v
        out[k.strip()] = val
    return out


def register(app: typer.Typer) -> None:
    from rich.console import Console

    console = Console(width=200)

    @app.command("validate-detector")
    def validate_detector(
        detector: str = typer.Option("pelt", help="zscore, pelt or cusum."),
        param: Optional[list[str]] = typer.Option(None, "--param", help="Detector parameter name=value (repeatable)."),
        replicates: int = typer.Option(10, help="Noise draws per fixture."),
        battery: str = typer.Option("standard", help="standard (ndtracker's + harder fixtures) or ndtracker."),
        run: Optional[Path] = typer.Option(None, help="Also store the report in this run as transitions/validity."),
    ) -> None:
        """Run a detector on planted-change and null fixtures; print recall, false positives, verdict."""
        from .._validation import check_choice, check_int
        from .detectors import make_detector
        from .fixtures import ndtracker_battery, standard_battery
        from .validity import validate

        check_choice(battery, "battery", ("standard", "ndtracker"))
        check_int(replicates, "replicates", min_value=1)
        det = make_detector(detector, **parse_params(param))
        fx = standard_battery(replicates) if battery == "standard" else ndtracker_battery(replicates)
        rep = validate(det, fx)
        typer.echo(rep.render())
        if run is not None:
            from ..store import RunStore

            with RunStore(run) as w:
                w.put_artifact("transitions/validity", rep.to_dict())
            console.print(f"stored transitions/validity in {run}")

    @app.command("analyze")
    def analyze(
        run: Path = typer.Argument(..., help="Run directory."),
        metric: Optional[list[str]] = typer.Option(None, "--metric", help="Metric(s) to analyse (default stable_rank, participation_ratio)."),
        detector: str = typer.Option("pelt", help="zscore, pelt or cusum."),
        param: Optional[list[str]] = typer.Option(None, "--param", help="Detector parameter name=value (repeatable)."),
        k: float = typer.Option(3.0, help="A change is significant when |size| >= k x noise floor."),
        convention: Optional[list[str]] = typer.Option(None, "--convention", help="Convention(s) to analyse (default: every recorded one)."),
        store: bool = typer.Option(True, help="Store phases / transitions as events and the tables as artifacts."),
        validity_replicates: int = typer.Option(10, help="Noise draws per fixture for the detector's validity report."),
    ) -> None:
        """Phases, significant transitions, correlations and convention sensitivity of a run."""
        from ..analysis.analyze import HEADLINE_METRICS, analyze_run
        from ..cli import _table
        from .detectors import make_detector

        det = make_detector(detector, **parse_params(param))
        a = analyze_run(
            run, metrics=tuple(metric) if metric else HEADLINE_METRICS, detector=det, k=k,
            conventions=list(convention) if convention else None, store=store, validity_replicates=validity_replicates,
        )
        v = a.validity
        console.print(f"[bold]dimscope analyze[/bold] {run} — primary convention {a.primary}; analysed: {', '.join(a.conventions)}")
        console.print(f"detector {v.detector}: {v.verdict} (mean recall {v.mean_recall:.2f}, worst null {v.worst_null_fp_per_1000:.2f} FP/1000 steps; `dimscope validate-detector` for the table)")
        nf = a.noise[a.noise.convention == a.primary][["layer", "metric", "noise_floor", "source"]]
        console.print(_table(nf, f"noise floor ({a.primary})"))
        ph = a.phases[a.phases.convention == a.primary].drop(columns=["convention"])
        console.print(_table(ph, f"phases ({a.primary})"))
        console.print(_table(a.early[a.early.convention == a.primary].drop(columns=["convention"]), "share of total variation in the first 10% / 25% of steps"))
        counts = a.transition_counts()
        console.print(_table(counts, f"transitions per layer and metric (significant: |size| >= {k:g} x noise floor)"))
        sig = a.transitions[(a.transitions.convention == a.primary) & a.transitions.significant]
        if len(sig):
            console.print(_table(sig[["layer", "metric", "step", "size", "noise_floor", "direction"]].head(40), f"significant transitions ({a.primary}, first 40)"))
        corr = a.correlations[["convention", "layer", "metric", "target", "rho", "lo", "hi", "best_lag", "leads"]]
        console.print(_table(corr, "Spearman rho with 95% block-bootstrap interval; lead/lag of the differenced series"))
        if len(a.resolution):
            console.print(_table(a.resolution, f"sampling resolution ({a.primary}): reference = every measurement"))
        console.print(_table(a.sensitivity, "convention sensitivity: does each conclusion hold under every recorded convention?"))
        if store:
            console.print(f"stored phase / transition events and analysis/* artifacts in {run}")
