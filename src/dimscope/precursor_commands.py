"""``dimscope precursor``: the geometry-before-behaviour reproduction, or the analysis of a checkpoint folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import typer

__all__ = ["register", "precursor_table", "summary_table"]


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def precursor_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per variant and seed: collapse minimum, t_geo, t_probe, t_beh, gaps (steps / checkpoints), verdict."""
    rows = []
    for r in per_seed.to_dict("records"):
        rows.append(
            {
                "variant": r.get("variant", ""),
                "seed": r["seed"],
                "RankMe min (step)": f"{r['rankme_min']:.2f} ({r['step_min']})",
                "t_geo": _fmt(r["t_geo"]),
                "t_probe": _fmt(r["t_probe"]),
                "t_beh": _fmt(r["t_beh"]),
                "final acc": _fmt(r.get("beh_final")),
                "gap geo (ckpt)": f"{_fmt(r['gap_geo'])} ({_fmt(r['gap_geo_ckpt'])})",
                "gap probe (ckpt)": f"{_fmt(r['gap_probe'])} ({_fmt(r['gap_probe_ckpt'])})",
                "spacing": _fmt(r["spacing"]),
                "verdict": r["verdict_geo"],
                "collapse order": r["collapse_order"],
            }
        )
    return pd.DataFrame(rows)


def summary_table(summary: dict[str, Any]) -> pd.DataFrame:
    """Per variant: the gaps' mean and interval over seeds, the verdicts."""
    rows = []
    for variant, s in summary["variants"].items():
        for tag in ("geo", "probe"):
            g = s[tag]
            rows.append(
                {
                    "variant": variant,
                    "gap": f"t_beh - t_{tag}",
                    "n seeds": g["n"],
                    "mean (steps)": _fmt(g["mean"]),
                    f"{int(100 * 0.95)}% interval": f"[{_fmt(g['lo'])}, {_fmt(g['hi'])}]",
                    "min..max": f"{_fmt(g['min'])}..{_fmt(g['max'])}",
                    "mean (ckpt)": _fmt(g["ckpt"]["mean"]),
                    "spacing": _fmt(s["spacing"]),
                    "verdict": g["verdict"],
                }
            )
    return pd.DataFrame(rows)


def register(app: typer.Typer) -> None:
    @app.command()
    def precursor(
        run: Path = typer.Option(Path("runs/precursor"), help="Run directory for results (artifacts precursor/...)."),
        quick: bool = typer.Option(False, "--quick", help="A small, fast variant (p=23, one seed, a few hundred steps) for tests."),
        seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (default 0,1,2; --quick: 0)."),
        variants: str = typer.Option("grokking,easy", help="Comma-separated variants: grokking (train fraction 0.5), easy (0.9)."),
        steps: Optional[int] = typer.Option(None, help="Optimizer steps of the grokking variant (default 3000)."),
        easy_steps: Optional[int] = typer.Option(None, help="Optimizer steps of the easy variant (default 1000)."),
        every: Optional[int] = typer.Option(None, "--every", help="Checkpoint every k steps (default 25)."),
        target: str = typer.Option("sum", help="Probe target: sum = (a+b) mod p, parity = ((a+b) mod p) mod 2."),
        checkpoints: Optional[Path] = typer.Option(
            None, help="Analyse this folder of recipe checkpoints (holding grok_config.json, or sub-folders that do) instead of training."
        ),
        keep_checkpoints: bool = typer.Option(True, help="Keep the checkpoint files under RUN/checkpoints."),
        jobs: int = typer.Option(2, help="Train the series in this many processes (one thread each); 2 suits a 2-core machine."),
        report: bool = typer.Option(False, help="Write the HTML report at the end (needs the report module)."),
    ) -> None:
        """Geometry before behaviour: RankMe collapse, probes and held-out accuracy over checkpoints; the precursor gap."""
        from rich.console import Console

        from ._validation import parse_ints
        from .cli import _table

        console = Console(width=180)
        t0 = time.perf_counter()
        if checkpoints is not None:
            out = _analyse_folder(checkpoints, run, target)
        else:
            from .recipes.grokking import run_precursor

            seed_list = list(parse_ints(seeds, "seeds", owner="dimscope precursor")) if seeds is not None else None
            steps_map = {}
            if steps is not None:
                steps_map["grokking"] = steps
            if easy_steps is not None:
                steps_map["easy"] = easy_steps
            out = run_precursor(
                run, quick=quick, seeds=seed_list, variants=[v.strip() for v in variants.split(",") if v.strip()],
                steps=steps_map, checkpoint_every=every, target=target, keep_checkpoints=keep_checkpoints, jobs=jobs,
                progress=lambda msg: console.print(msg),
            )
        console.print(_table(precursor_table(out["per_seed"]), "precursor gap per seed (steps; checkpoints in brackets)"))
        console.print(_table(summary_table(out["summary"]), "precursor gap over seeds"))
        console.print(f"criterion: {out['summary']['criterion']}")
        console.print(f"{time.perf_counter() - t0:.1f} s · run: {run}")
        if report:
            try:
                from .report import write_report  # type: ignore[attr-defined]
            except ImportError:
                console.print("report module not available; skipped the HTML report")
                return
            console.print(f"report: {write_report(run)}")


def _analyse_folder(folder: Path, run: Path, target: str) -> dict[str, Any]:
    """Analyse one recipe series (folder with grok_config.json) or every such sub-folder (one per seed)."""
    from .analysis.precursor import precursor_gap
    from .recipes.grokking import CONFIG_FILE, CURVE_METRICS, analyze_grokking_dir, curves, load_config
    from .store import RunStore

    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        series = [folder]
    else:
        series = sorted(d for d in folder.iterdir() if d.is_dir() and (d / CONFIG_FILE).is_file()) if folder.is_dir() else []
    if not series:
        raise FileNotFoundError(
            f"No recipe checkpoint series in {folder}: expected {folder / CONFIG_FILE} or sub-folders holding one. "
            "For other models use dimscope.checkpoints.analyze_checkpoints in Python."
        )
    behs, geos, prbs, frames = {}, {}, {}, []
    p = None
    for d in series:
        cfg = load_config(d)
        p = cfg.p
        with RunStore(Path(run) / "seeds" / d.name, overwrite=True) as store:
            df, errors = analyze_grokking_dir(d, store, target=target)
        for e in errors:
            print(f"skipped: {e}")
        behs[d.name], geos[d.name], prbs[d.name] = curves(df)
        f = df[df["metric"].isin(CURVE_METRICS)][["step", "layer", "metric", "value"]].copy()
        f.insert(0, "seed", d.name)
        f.insert(0, "variant", folder.name)
        frames.append(f)
    assert p is not None
    res = precursor_gap(behs, geos, prbs, chance=1.0 / p, probe_chance=1.0 / (p if target == "sum" else 2))
    per_seed = res.per_seed.copy()
    per_seed.insert(0, "variant", folder.name)
    per_layer = res.per_layer.copy()
    per_layer.insert(0, "variant", folder.name)
    summary = {"variants": {folder.name: {**res.summary, "p": p, "target": target}}, "criterion": res.params.criterion()}
    curves_df = pd.concat(frames, ignore_index=True)
    with RunStore(run) as store:
        store.put_artifact("precursor/per_seed", per_seed)
        store.put_artifact("precursor/per_layer", per_layer)
        store.put_artifact("precursor/curves", curves_df)
        store.put_artifact("precursor/summary", summary)
        store.commit()
    return {"per_seed": per_seed, "per_layer": per_layer, "summary": summary, "curves": curves_df}
