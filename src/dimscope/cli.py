"""The ``dimscope`` command line. ``main(argv)`` is callable from tests."""

from __future__ import annotations

import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="dimscope: what happens inside a network while it trains.")
console = Console(width=max(110, shutil.get_terminal_size((120, 24)).columns))
err_console = Console(width=max(110, shutil.get_terminal_size((120, 24)).columns), stderr=True)


def _table(df, title: str) -> Table:  # type: ignore[no-untyped-def]
    """A rich table of a DataFrame; text is escaped, so "[min, max]" is printed, not read as markup."""
    from rich.markup import escape

    t = Table(title=escape(title))
    for c in df.columns:
        t.add_column(escape(str(c)), justify="right" if df[c].dtype.kind in "fiu" else "left")
    for _, row in df.iterrows():
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else escape(str(v)) for v in row.tolist()])
    return t


@app.command()
def demo(
    steps: int = typer.Option(8000, help="Optimizer steps."),
    every: int = typer.Option(5, help="Measure every k steps."),
    run: Path = typer.Option(Path("runs/demo"), help="Run directory (overwritten)."),
    seed: int = typer.Option(0, help="Seed for the model, the split and the batches."),
    report: bool = typer.Option(True, help="Write the HTML report at the end."),
    mode: str = typer.Option("probe", help="Measurement mode(s), comma-separated: probe, batch (first is the default convention)."),
    conventions: str = typer.Option("centered", help="Centering convention(s), comma-separated: centered, uncentered."),
) -> None:
    """Train the reference MLP on load_digits with a Tracker, then print the summary."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .recipes.demo import run_demo, summary_table
    from .store import open_run

    modes = tuple(m.strip() for m in mode.split(",") if m.strip())
    convs = tuple(c.strip() for c in conventions.split(",") if c.strip())
    for name, given, got in (("--mode", mode, modes), ("--conventions", conventions, convs)):
        if not got:
            raise ValueError(f"The '{name}' option of dimscope demo must name at least one value. Got {given!r}.")
    t0 = time.perf_counter()
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(), console=console, transient=False) as prog:
        task = prog.add_task("train", total=steps)

        def progress(step: int) -> None:
            if step % 50 == 0 or step == steps - 1:
                prog.update(task, completed=step + 1)

        out = run_demo(run, steps=steps, every=every, seed=seed, progress=progress, conventions=convs,
                       tracker_kwargs={"mode": modes if len(modes) > 1 else modes[0]})
    elapsed = time.perf_counter() - t0
    r = open_run(run)
    console.print(_table(summary_table(r), f"dimscope demo — {steps} steps, every {every}, probe {r.manifest.get('probe_size')} held-out digits"))
    console.print(f"test accuracy {out['test_accuracy']:.3f} · final batch loss {out['final_loss']:.4f} · {elapsed:.1f} s · run: {run}")
    if report:
        try:
            from .report import write_report
        except ImportError:
            return
        path = write_report(run)
        console.print(f"report: {path}")


@app.command()
def summary(run: Path = typer.Argument(..., help="Run directory.")) -> None:
    """Per layer: initial / minimum / final stable rank and participation ratio, ρ with the loss."""
    from .recipes.demo import summary_table
    from .store import open_run

    r = open_run(run)
    table = summary_table(r)
    if table.empty:
        console.print(f"dimscope summary — {run}: no activation measurements in this run (it holds "
                      f"{', '.join(r.artifacts()) or 'no artifacts'}); `dimscope report {run}` shows what it holds.", soft_wrap=True)
        return
    console.print(_table(table, f"dimscope summary — {run}"))


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run directory."),
    format: str = typer.Option("csv", "--format", help="csv or parquet."),
    out: Optional[Path] = typer.Option(None, help="Output file or folder (default: the run directory)."),
) -> None:
    """Export the run's scalars (long format) to CSV or Parquet."""
    from .store import open_run

    r = open_run(run)
    path = r.export(out or run, format=format)
    console.print(f"wrote {path}")


# Each capability registers its commands from its own module (``register(app)``), so areas do not
# edit one another's code. A module that does not exist yet is skipped.
_COMMAND_MODULES = (
    "dimscope.transitions.commands",
    "dimscope.report.commands",
    "dimscope.jacobian.commands",
    "dimscope.staircase.commands",
    "dimscope.precursor_commands",
    "dimscope.experiments.commands",
)


def _register_commands() -> None:
    import importlib

    for mod in _COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and (mod == e.name or mod.startswith(e.name + ".")):
                continue
            raise
        module.register(app)


_register_commands()


def _click_errors() -> tuple[type[BaseException], ...]:
    """The usage-error class of the click that typer uses: its own bundled copy (typer >= 0.26, which
    need not install click at all) or click's."""
    types: list[type[BaseException]] = []
    try:
        from typer._click.exceptions import ClickException as TyperClickException
    except ImportError:  # typer that uses click itself
        pass
    else:
        types.append(TyperClickException)
    try:
        import click
    except ImportError:
        pass
    else:
        types.append(click.ClickException)
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit code: 0, 2 for a usage
    or input error (a message on stderr, no traceback), 1 for a file that cannot be written or, for
    want of permissions, read (a run whose unmerged log cannot be read without write access)."""
    args = argv if argv is not None else sys.argv[1:]
    try:
        app(args=args, standalone_mode=False)
    except SystemExit as e:  # pragma: no cover
        return int(e.code or 0)
    except typer.Exit as e:
        return int(e.exit_code)
    except (ValueError, FileNotFoundError, KeyError, TypeError, sqlite3.DatabaseError) as e:
        err_console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        return 2
    except OSError as e:  # e.g. an output folder that does not exist or a file in the way
        err_console.print(f"[red]error:[/red] {e}", soft_wrap=True)
        return 1
    except _click_errors() as e:  # usage errors: a missing argument, an unknown option or command
        if type(e).__name__ == "NoArgsIsHelpError":  # no arguments: the help, and not as an error
            print(e.format_message())  # type: ignore[attr-defined]
            return 0
        e.show()  # type: ignore[attr-defined]
        return int(getattr(e, "exit_code", 2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
