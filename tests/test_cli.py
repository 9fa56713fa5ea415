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
    assert "No dimscope run" in capsys.readouterr().err
    assert main(["demo", "--every", "0", "--steps", "5", "--run", str(tmp_path / "x"), "--no-report"]) == 2
    assert "'every' parameter of run_demo must be an int >= 1. Got 0" in capsys.readouterr().err
    # usage errors: a message and exit code 2, no traceback (typer bundles its own click exceptions)
    for argv, says in ((["summary"], "Missing argument"), (["nosuchcmd"], "No such command 'nosuchcmd'"),
                       (["demo", "--steps", "abc"], "Invalid value for '--steps'")):
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err
    assert main([]) == 0 and "Usage:" in capsys.readouterr().out  # no arguments: the help


def test_cli_never_writes_over_or_into_what_is_not_a_run(tmp_path, capsys):
    user = tmp_path / "userdata.csv"
    user.write_text("important\n")
    assert main(["demo", "--steps", "2", "--every", "1", "--run", str(user), "--no-report"]) == 2
    assert user.read_text() == "important\n" and "not a dimscope run: it is not a SQLite database" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "dimscope.sqlite").write_bytes(b"")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dimscope.sqlite").write_bytes(b"\x01" * 5000)
    for name, says in (("empty", "it is an empty file"), ("bad", "it is not a SQLite database")):
        for cmd in ("summary", "export", "report"):
            assert main([cmd, str(tmp_path / name)]) == 2
            assert says in capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["dimscope.sqlite"]  # read, not written
    assert (tmp_path / "empty" / "dimscope.sqlite").stat().st_size == 0
    # an output path that cannot be written: a message and exit code 1
    run = tmp_path / "r"
    assert main(["demo", "--steps", "4", "--every", "2", "--run", str(run), "--no-report"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "new" / "dir" / "x.csv")]) == 0  # folders made
    assert (tmp_path / "new" / "dir" / "x.csv").exists()
    assert main(["export", str(run), "--out", str(user / "x.csv")]) == 1  # a file where a folder must be
    assert "error:" in capsys.readouterr().err
    # the run given by its database file: the export goes beside the database, which stays a run
    assert main(["export", str(run / "dimscope.sqlite")]) == 0
    assert (run / "scalars.csv").exists() and main(["summary", str(run)]) == 0


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


def test_a_run_started_afresh_leaves_no_stale_report_or_export(tmp_path, capsys):
    run = tmp_path / "d"
    assert main(["demo", "--steps", "20", "--every", "5", "--run", str(run)]) == 0
    assert main(["export", str(run)]) == 0
    assert (run / "report" / "report.html").exists() and (run / "scalars.csv").exists()
    assert main(["demo", "--steps", "10", "--every", "5", "--run", str(run), "--no-report"]) == 0
    assert not (run / "report" / "report.html").exists() and not (run / "scalars.csv").exists()
    assert main(["summary", str(run)]) == 0
    capsys.readouterr()
    # a run without activation measurements: summary says so
    with dimscope.RunStore(tmp_path / "a") as w:
        w.put_artifact("x", {"a": 1})
    assert main(["summary", str(tmp_path / "a")]) == 0
    assert "no activation measurements in this run" in capsys.readouterr().out
    assert main(["demo", "--mode", ",", "--steps", "2", "--run", str(tmp_path / "m")]) == 2
    assert "The '--mode' option of dimscope demo must name at least one value. Got ','" in capsys.readouterr().err


def test_experiment_options_are_checked_before_anything_runs(tmp_path, capsys):
    for argv, says in ((["precursor", "--quick", "--seeds", "abc", "--run", str(tmp_path / "p")],
                        "The 'seeds' parameter of dimscope precursor must be comma-separated ints. Got 'abc'"),
                       (["jacobian", "--quick", "--seeds", ","], "The 'seeds' parameter of dimscope jacobian must be comma-separated ints"),
                       (["jacobian", "--quick", "--report"], "The '--report' option of dimscope jacobian needs --run")):
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
