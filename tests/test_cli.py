import pandas as pd
import pytest

import dimscope
from dimscope.cli import main


def test_demo_summary_export(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--steps", "60", "--every", "10", "--run", str(run), "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "stable_rank" in out and "participation_ratio" in out and "test accuracy" in out
    r = dimscope.open_run(run)
    assert list(r.metric("stable_rank", "0").index) == [0, 10, 20, 30, 40, 50]
    assert r.manifest["config"]["recipe"] == "demo" and r.manifest["probe_size"] == 512
    assert set(r.layers) == {"0", "2", "4"}
    assert len(r.training("grad_norm")) == 6
    assert main(["summary", str(run)]) == 0
    assert "rho_loss" in capsys.readouterr().out
    assert main(["export", str(run), "--format", "csv"]) == 0
    df = pd.read_csv(run / "scalars.csv")
    assert len(df) == len(r.scalars())


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["summary", str(tmp_path / "missing")]) == 2
    assert "No dimscope run" in capsys.readouterr().out
    assert main(["demo", "--every", "0", "--steps", "5", "--run", str(tmp_path / "x"), "--no-report"]) == 2
    assert "'every' parameter of run_demo must be an int >= 1. Got 0" in capsys.readouterr().out


def test_summary_table_values(tmp_path):
    from dimscope.recipes.demo import run_demo, summary_table

    run_demo(tmp_path / "s", steps=40, every=5)
    r = dimscope.open_run(tmp_path / "s")
    t = summary_table(r)
    row = t[(t.layer == "2") & (t.metric == "stable_rank")].iloc[0]
    s = r.metric("stable_rank", "2")
    assert row.initial == pytest.approx(s.iloc[0]) and row.final == pytest.approx(s.iloc[-1])
    assert row.minimum == pytest.approx(s.min()) and row.step_of_min == s.idxmin()
    assert -1 <= row.rho_loss <= 1
