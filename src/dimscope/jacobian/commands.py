"""``dimscope jacobian``: the training-Jacobian reproduction (Belrose & Scherlis, arXiv 2412.07003)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def jacobian(
        run: Optional[Path] = typer.Option(None, "--run", help="Run directory: results stored as artifacts 'jacobian/...'."),
        quick: bool = typer.Option(False, "--quick", help="Small model (hidden 8, 2 epochs): seconds, for tests."),
        seeds: str = typer.Option("0,1,2", help="Initialization seeds (comma-separated); the first is the main run."),
        experiments: str = typer.Option(
            "perturbation,kl,restricted,variants,seeds", help="Comma-separated subset of perturbation,kl,restricted,variants,seeds."
        ),
        variants: str = typer.Option("mse,shuffled_labels,white_noise_inputs", help="Which variants the 'variants' experiment runs."),
        overwrite: bool = typer.Option(False, help="Start the run directory afresh."),
        report: bool = typer.Option(False, help="Write the HTML report of the run at the end (needs --run)."),
    ) -> None:
        """Dense training Jacobian of the paper's digits MLP, its chaotic/bulk/stable regions and experiments."""
        from rich.console import Console
        from rich.table import Table

        from .._validation import check_choice, parse_ints
        from .reproduce import comparison_table, reproduce

        console = Console(width=160)  # the tables stay readable when the output is piped
        exps = tuple(e.strip() for e in experiments.split(",") if e.strip())
        for e in exps:
            check_choice(e, "experiments", ("perturbation", "kl", "restricted", "variants", "seeds"), owner="dimscope jacobian")
        seed_t = parse_ints(seeds, "seeds", owner="dimscope jacobian")
        if report and run is None:
            raise ValueError("The '--report' option of dimscope jacobian needs --run (the run the report is written from).")
        res = reproduce(run, quick=quick, seeds=seed_t, experiments=exps, log=console.print, overwrite=overwrite,
                        variants=tuple(v.strip() for v in variants.split(",") if v.strip()))
        df = comparison_table(res)
        t = Table(title="training Jacobian: dimscope beside Belrose & Scherlis (arXiv 2412.07003)" + (" (--quick: not comparable)" if quick else ""))
        for c in df.columns:
            t.add_column(c)
        for rec in df.itertuples(index=False):
            t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in rec])
        console.print(t)
        if report and run is not None:
            try:
                from ..report import write_report  # type: ignore[attr-defined]
            except ImportError:
                console.print("report: dimscope.report.write_report is not available in this build")
                return
            console.print(f"report: {write_report(run)}")
