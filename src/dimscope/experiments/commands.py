"""CLI: ``dimscope intervene``, ``dimscope screen``, ``dimscope formation``."""

from __future__ import annotations

from pathlib import Path

import typer


def _console():  # type: ignore[no-untyped-def]
    from ..cli import console  # wide enough for the tables also when the output is piped

    return console


def _print_df(df, title: str) -> None:  # type: ignore[no-untyped-def]
    from ..cli import _table

    _console().print(_table(df, title))


def register(app: typer.Typer) -> None:
    """Add the experiment commands to the ``dimscope`` app."""

    @app.command()
    def intervene(
        out: Path = typer.Option(Path("runs/intervention"), help="Run directory for the results (overwritten)."),
        quick: bool = typer.Option(False, "--quick", help="300 steps and 4 short windows (about a minute)."),
        corruption: str = typer.Option("label_noise", help="label_noise or input_noise."),
        strength: float = typer.Option(1.0, help="Label-noise probability, or input-noise standard deviation."),
        seeds: int = typer.Option(3, help="Number of seeds (0 … n-1)."),
    ) -> None:
        """Intervention windows on load_digits: corrupt one window of steps at a time; what is lost for good?"""
        from .recipes import intervention_recipe

        con = _console()
        if seeds < 1:
            raise ValueError(f"The 'seeds' parameter of intervene must be an int >= 1. Got {seeds} instead.")
        res = intervention_recipe(out, quick=quick, corruption=corruption, strength=strength, seeds=tuple(range(seeds)), progress=con.print)
        cols = ["window", "accuracy_mean", "loss_mean", "loss_std", "loss_min", "loss_max", "loss_lo", "loss_hi", "lasting", "worst_class",
                "worst_class_loss", "geometry_final_rel_diff"]
        _print_df(res.summary[cols], f"intervention — {res.config['corruption']} {res.config['strength']}, {res.config['steps']} steps, "
                  f"{len(res.config['seeds'])} seeds; loss = clean − window final test accuracy")
        con.print(f"{res.config['elapsed_s']} s · results: {out}")

    @app.command()
    def screen(
        out: Path = typer.Option(Path("runs/screening"), help="Run directory for the results (overwritten)."),
        quick: bool = typer.Option(False, "--quick", help="Six candidates × 300 steps."),
        early_fraction: float = typer.Option(0.1, help="Share of the steps the early score may see."),
    ) -> None:
        """Architecture screening on load_digits: does the early expansion predict the final accuracy?"""
        from .recipes import screening_recipe

        con = _console()
        res = screening_recipe(out, quick=quick, early_fraction=early_fraction, progress=con.print)
        _print_df(res.table.drop(columns=["seed"]), f"candidates — early scores at step {res.config['early_step']} of {res.config['steps']}")
        _print_df(res.summary, f"Spearman ρ(early score, final accuracy), {int(res.config['confidence'] * 100)} % bootstrap interval")
        con.print(f"{res.config['elapsed_s']} s · results: {out}")

    @app.command()
    def formation(
        run: Path = typer.Option(Path("runs/formation"), help="Run directory (overwritten)."),
        quick: bool = typer.Option(False, "--quick", help="200 steps."),
    ) -> None:
        """Feature formation map on load_digits: when each digit becomes linearly decodable, per layer."""
        from .recipes import formation_recipe

        res = formation_recipe(run, quick=quick)
        first = res["first"].pivot(index="layer", columns="class", values="first_step")
        first = first.reset_index()
        first.columns = [str(c) for c in first.columns]
        _print_df(first, "first step each class is decodable (ridge probe, AUC ≥ 0.95 twice in a row; nan = never)")
        _console().print(f"test accuracy {res['test_accuracy']:.3f} · run: {run}")
