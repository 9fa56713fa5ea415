"""``dimscope staircase``: the ε-rank staircase reproduction (see :mod:`dimscope.staircase.recipe`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def staircase(
        quick: bool = typer.Option(False, "--quick", help="A short version for tests (2 seeds, 300/200 steps)."),
        seeds: Optional[int] = typer.Option(None, "--seeds", help="Number of seeds per condition (default 5; 2 with --quick)."),
        run: Path = typer.Option(Path("runs/staircase"), "--run", help="Run directory (overwritten); artifacts under 'staircase/'."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps for every target (default 3000 for 1-D, 2000 for 2-D)."),
        every: int = typer.Option(10, "--every", help="Measure the ε-rank every k steps."),
        targets: str = typer.Option("1d,2d", "--targets", help="Comma-separated targets among 1d, 2d."),
        workers: int = typer.Option(2, "--workers", help="Train this many runs at once in separate processes (1 = inline)."),
        method: str = typer.Option("structured", "--method", help="Pre-training method: structured, decorrelate or both."),
        sharpness: float = typer.Option(1.0, "--sharpness", help="Sharpness of the structured first layer."),
        report: bool = typer.Option(False, "--report/--no-report", help="Write the HTML report afterwards."),
    ) -> None:
        """Loss staircase vs ε-rank steps of a 4x64 tanh MLP, with and without first-layer pre-training."""
        from rich.console import Console

        from ..cli import _table
        from .recipe import run_staircase
        from .report import summary_table

        console = Console(width=200)
        n_seeds = seeds if seeds is not None else (2 if quick else 5)
        t0 = time.perf_counter()
        out = run_staircase(
            run, seeds=n_seeds, targets=[t.strip() for t in targets.split(",") if t.strip()], steps=steps,
            every=every, quick=quick, pretrain={"method": method, "sharpness": sharpness}, workers=workers,
            progress=lambda s: console.print(s),
        )
        elapsed = time.perf_counter() - t0
        console.print(_table(summary_table(out["summary"]), "dimscope staircase — terminal hidden layer; spread = [min, max] over seeds"))
        order = out["ordering"]
        finals = [c for c in order.columns if c.startswith("final_")]
        agg = order.groupby(["target", "condition"], sort=False)[["share_ordered", *finals]].median().reset_index()
        console.print(_table(agg, "per-layer ordering (median over seeds): share of measurements with ε-rank non-decreasing with depth; final ε-rank"))
        console.print(f"{elapsed:.1f} s · run: {run}")
        if report:
            try:
                from ..report import write_report
            except ImportError:
                console.print("report: dimscope.report.write_report is not available in this installation")
                return
            console.print(f"report: {write_report(run)}")
