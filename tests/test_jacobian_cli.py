"""``dimscope jacobian --quick``: artifacts in the run store and the report section."""

from __future__ import annotations

import numpy as np

from dimscope.cli import main
from dimscope.store import open_run


def test_cli_quick_stores_artifacts_and_report_section(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    rc = main(["jacobian", "--quick", "--run", str(run), "--seeds", "0,1", "--experiments", "kl,seeds"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "beside Belrose & Scherlis" in out and "717/2984/1109" in out
    r = open_run(run)
    names = set(r.artifacts())
    assert {"jacobian/singular_values", "jacobian/alignment", "jacobian/regions", "jacobian/summary", "jacobian/kl",
            "jacobian/seeds", "jacobian/overlap"} <= names
    s = r.artifact("jacobian/singular_values")
    assert s.shape == (610,) and np.all(np.diff(s) <= 1e-6)  # 64*8+8+8*10+10 parameters, descending
    reg = r.artifact("jacobian/regions")
    assert list(reg["tau"]) == [0.1, 0.01, 1e-3]
    assert (reg[["chaotic", "bulk", "stable"]].sum(axis=1) == 610).all()
    assert int(reg.loc[0, "bulk"]) == int((np.abs(s - 1) <= 0.1).sum())
    seeds = r.artifact("jacobian/seeds")
    assert sorted(set(seeds["seed"])) == [0, 1]
    ov = r.artifact("jacobian/overlap")
    assert 0 < ov["mean_cos2"].iloc[0] <= 1
    kl = r.artifact("jacobian/kl")
    assert set(kl.columns) >= {"train", "test", "noise", "inverted"} and (kl[["train", "test"]] >= 0).all().all()

    from dimscope.jacobian.report import report_section

    sec = report_section(r)
    assert sec is not None and {"jacobian_spectrum", "jacobian_alignment", "jacobian_kl"} <= set(sec.figures)
    for stem in sec.figures:
        assert "{{fig:" + stem + "}}" in sec.html
    r.close()


def test_report_section_is_none_without_jacobian(tmp_path) -> None:
    from dimscope.jacobian.report import report_section
    from dimscope.store import RunStore

    with RunStore(tmp_path / "empty"):
        pass
    assert report_section(open_run(tmp_path / "empty")) is None


def test_cli_rejects_unknown_experiment(tmp_path, capsys) -> None:
    rc = main(["jacobian", "--quick", "--experiments", "bogus"])
    assert rc == 2
    assert "'experiments' parameter of dimscope jacobian must be one of" in capsys.readouterr().err
