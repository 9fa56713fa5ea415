"""``dimscope report RUN [--out DIR]``: write the self-contained HTML report of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to the dimscope CLI."""

    @app.command("report")
    def report(
        run: Path = typer.Argument(..., help="Run directory."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN/report)."),
        analyze: bool = typer.Option(True, help="Run the transitions analysis first when the run holds none of its default convention (it replaces a stored one)."),
    ) -> None:
        """Write RUN's report.html (images inline, no network access needed) and its PNG files."""
        from ..cli import console
        from .html import write_report

        path = write_report(run, out, analyze=analyze)
        console.print(f"report: {path}")
