"""The report: plots, core sections, the self-contained HTML page and the ``dimscope report`` command."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import textwrap
import types
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import dimscope
from dimscope import RunStore, open_run

#: Section anchors the core report must contain for a run holding every kind of result, in order.
REPORT_SECTIONS = ["conventions", "overview", "layers", "spectra", "activation-vs-weight", "correlations", "transitions", "validity"]

PROBE_ROWS = 20  # smaller than layer "0"'s width (32): its ceiling is n - 1 = 19, set by the probe

VALIDITY = {
    "detector": "Pelt",
    "params": {"penalty": 12.5, "min_recall": 0.8, "max_fp_per_1000": 2.0},
    "fixtures": [
        {"name": "planted steps", "kind": "positive", "recall": 1.0, "fp_per_1000": None},
        {"name": "small steps 2 sigma", "kind": "positive", "recall": 0.6, "fp_per_1000": None},
        {"name": "white noise", "kind": "null", "recall": None, "fp_per_1000": 0.0},
        {"name": "AR(1) 0.9", "kind": "null", "recall": None, "fp_per_1000": 1.5},
    ],
    "verdict": "VALID",
}


def make_run(path: Path, *, steps: int = 100, every: int = 2, analysis: bool = True) -> Path:
    """A small tracked run (MLP 8-32-16-3 on a synthetic task) plus, when ``analysis``, the events and
    artifacts of the transitions analysis written by hand (phases, one significant and one
    insignificant transition, an alert, validity, correlations, noise floors)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    probe = torch.randn(PROBE_ROWS, 8, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with dimscope.Tracker(model, probe=probe, every=every, layers=["0", "2"], run=str(path), overwrite=True, background=False, grad_norm=True) as tr:
        for step in range(steps):
            idx = torch.randint(0, 256, (32,), generator=g)
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            tr.step(step, loss=loss.item())
            opt.step()
    if analysis:
        with RunStore(path) as st:
            third = steps // 3
            for label, a, b, share in (("collapse", 0, 20, 0.6), ("expansion", 20, 2 * third, 0.3), ("stabilization", 2 * third, steps - 1, 0.1)):
                st.add_event(None, "phase", layer="0", metric="stable_rank", payload={"label": label, "start": a, "end": b, "share_of_change": share})
            st.add_event(20, "transition", layer="0", metric="stable_rank", payload={"detector": "Pelt", "size": 0.8, "noise_floor": 0.05, "significant": True, "direction": "down"})
            st.add_event(40, "transition", layer="0", metric="stable_rank", payload={"detector": "Pelt", "size": 0.01, "noise_floor": 0.05, "significant": False, "direction": "up"})
            st.add_event(30, "alert", layer="2", metric="participation_ratio", payload={"alert": "collapse", "message": "fell below 50% of its running maximum"})
            st.put_artifact("transitions/validity", VALIDITY)
            st.put_artifact(
                "analysis/correlations",
                pd.DataFrame([{"layer": "0", "metric": "stable_rank", "target": "loss", "rho": -0.42, "lo": -0.6, "hi": -0.2, "best_lag": 10, "leads": True}]),
            )
            st.put_artifact("analysis/noise_floor", pd.DataFrame([{"layer": "0", "metric": "stable_rank", "noise_floor": 0.05}]))
    return path


class _Page(HTMLParser):
    """Collects what the self-containment checks need."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []
        self.sections: list[str] = []
        self.scripts = 0
        self.images: list[str] = []
        self.styles: list[str] = []
        self._in_style = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        a = dict(attrs)
        for k in ("src", "href", "action", "data", "poster", "srcset"):
            if k in a:
                self.urls.append((tag, k, a[k] or ""))
        if tag == "script":
            self.scripts += 1
        if tag == "section":
            self.sections.append(a.get("id", ""))
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "style":
            self._in_style = True

    def handle_endtag(self, tag):  # type: ignore[no-untyped-def]
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        (self.styles if self._in_style else self.text).append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("report")
    run = make_run(tmp / "run")
    from dimscope.report import write_report

    path = write_report(run, tmp / "out", analyze=False)
    return run, path, path.read_text(encoding="utf-8")


class _Tables(HTMLParser):
    """The tables of an HTML fragment as DataFrames (cells as text; numbers converted where possible)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):  # type: ignore[no-untyped-def]
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        if self._cell is not None:
            self._cell.append(data)


def read_tables(fragment: str) -> list[pd.DataFrame]:
    p = _Tables()
    p.feed(fragment)
    out = []
    for rows in p.tables:
        df = pd.DataFrame(rows[1:], columns=rows[0])
        for c in df.columns:
            try:
                df[c] = pd.to_numeric(df[c])
            except (ValueError, TypeError):
                pass
        out.append(df)
    return out


def _section(html: str, anchor: str) -> str:
    start = html.index(f"<section id='{anchor}'>")
    return html[start : html.index("</section>", start)]


def test_report_html_parses_and_is_self_contained(report: tuple[Path, Path, str]) -> None:
    run, path, html = report
    assert path.name == "report.html" and path.parent.name == "out"
    page = _Page()
    page.feed(html)
    page.close()
    # every core section, in the documented order
    assert [s for s in page.sections if s in REPORT_SECTIONS] == REPORT_SECTIONS
    assert not [s for s in page.sections if s.startswith("error-")]
    # no external reference of any kind
    assert page.scripts == 0
    for tag, attr, url in page.urls:
        assert url.startswith("data:") or url.startswith("#"), (tag, attr, url[:80])
    css = "".join(page.styles)
    assert "@import" not in css and "url(" not in css
    assert "http://" not in html and "https://" not in html
    assert "{{fig:" not in html
    # every image is an inline PNG that decodes, and is the same bytes as a PNG file beside the report
    from PIL import Image

    files = {p.read_bytes() for p in path.parent.glob("*.png")}
    assert len(page.images) == len(files) == 1 + 2 + 2 + 1 + 2 + 1  # overview, 2 layers, 2 spectra, act/weight, 2 scatters, validity
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data in files
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.format == "PNG" and min(im.size) > 100


def test_report_states_conventions_and_ceilings(report: tuple[Path, Path, str]) -> None:
    run, _, html = report
    sec = _section(html, "conventions")
    assert "probe/centered" in sec and "<b>centered</b>" in sec
    assert f"{PROBE_ROWS} inputs" in sec
    assert "every 2 optimizer steps, steps 0–98, 50 measurements" in sec
    # ceilings: layer 0 is capped by the probe (min(20-1, 32) = 19), layer 2 by its width (min(19, 16) = 16)
    rows = read_tables(sec.split("<h3>Ceilings per layer</h3>")[1])[0]
    rows["layer"] = rows["layer"].astype(str)
    c = rows.set_index("layer")["ceiling min(n−1, d)"]
    assert c.loc["0"] == 19 and c.loc["2"] == 16
    r = open_run(run)
    assert rows.set_index("layer").loc["0", "max eps_rank"] == r.metric("eps_rank", "0").max()
    # detector and thresholds, read from the validity artifact's params (0.8, not the 0.75 default)
    assert "Pelt" in sec and "mean recall ≥ 0.8" in sec and "penalty" in sec
    assert "commit" in sec and "WAL" in sec
    defs = read_tables(sec.split("<h3>Metric definitions</h3>")[1])[0].set_index("metric")
    assert defs.loc["eps_rank", "parameters"] == "eps=0.001, relative=True"
    assert defs.loc["energy_rank", "parameters"] == "q=0.9"


def test_report_transition_and_validity_sections(report: tuple[Path, Path, str]) -> None:
    _, _, html = report
    tr = _section(html, "transitions")
    assert "1 significant of 2 detected changes" in tr
    sig = read_tables(tr.split("<h4>Significant transitions</h4>")[1])[0]
    assert sig["step"].tolist() == [20]
    assert "collapse" in tr and "expansion" in tr and "stabilization" in tr
    assert "fell below 50% of its running maximum" in tr
    val = _section(html, "validity")
    assert "class='verdict valid'>VALID<" in val
    assert "AR(1) 0.9" in val
    corr = _section(html, "correlations")
    assert "best_lag" in corr and "-0.42" in corr


def test_plot_layer_shades_phases_and_marks_only_significant(report: tuple[Path, Path, str]) -> None:
    from matplotlib.colors import to_hex

    from dimscope.plot import PHASE_COLORS, plot_layer

    run, _, _ = report
    fig = plot_layer(run, "0", ["stable_rank"])
    ax = fig.axes[0]
    assert [to_hex(p.get_facecolor()[:3]) for p in ax.patches] == [PHASE_COLORS[k] for k in ("collapse", "expansion", "stabilization")]
    spans = sorted((round(p.get_x()), round(p.get_x() + p.get_width())) for p in ax.patches)
    assert spans == [(0, 20), (20, 66), (66, 99)]
    vlines = [ln for ln in ax.lines if len(ln.get_xdata()) == 2 and ln.get_xdata()[0] == ln.get_xdata()[1]]
    assert [float(ln.get_xdata()[0]) for ln in vlines] == [20.0]
    assert "1 significant transition (1 below noise floor, not drawn)" in ax.get_title()
    # the loss is on a twin axis sharing x
    twins = [a for a in fig.axes if a is not ax and a.bbox.bounds == ax.bbox.bounds]
    assert twins and twins[0].get_ylabel() == "loss"
    with pytest.raises(KeyError, match="'layer' parameter of plot_layer"):
        plot_layer(run, "nope")


def test_plot_metric_vs_loss_rho_matches_scipy(report: tuple[Path, Path, str]) -> None:
    from scipy.stats import spearmanr

    from dimscope.plot import plot_metric_vs_loss

    run, _, _ = report
    r = open_run(run)
    fig = plot_metric_vs_loss(r, "participation_ratio")
    s, loss = r.metric("participation_ratio", "2"), r.training("loss")
    steps = s.index.intersection(loss.index)
    assert len(steps) == 50
    expected = spearmanr(s.loc[steps], loss.loc[steps]).statistic
    assert fig.axes[1].get_title() == f"2: ρ = {expected:+.3f} (n = 50)"


def test_spectrum_heatmap_is_the_stored_spectra(report: tuple[Path, Path, str]) -> None:
    from dimscope.plot import plot_spectrum_heatmap

    run, _, _ = report
    r = open_run(run)
    fig = plot_spectrum_heatmap(r, "2", dynamic_range=1e-6)
    mesh = fig.axes[0].collections[0]
    arr = np.asarray(mesh.get_array()).reshape(16, 50)
    specs = r.spectra("2")
    top = max(s.values.max() for s in specs.values)
    expected = np.log10(np.clip(np.stack([s.values for s in specs.values], axis=1), top * 1e-6, None))
    np.testing.assert_allclose(arr, expected, rtol=1e-12)
    assert "ceiling min(n−1, d) = 16" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    with pytest.raises(ValueError, match="'max_columns' parameter of plot_spectrum_heatmap must be an int >= 2. Got 1"):
        plot_spectrum_heatmap(r, "2", max_columns=1)
    with pytest.raises(ValueError, match="'xscale' parameter"):
        plot_spectrum_heatmap(r, "2", xscale="log")


def test_validity_panel_colours_each_fixture_against_its_threshold() -> None:
    from matplotlib.colors import to_hex

    from dimscope.plot import plot_validity

    fig = plot_validity({**VALIDITY, "verdict": "NOT VALID"})
    recall_ax, fp_ax = fig.axes[:2]
    assert [to_hex(b.get_facecolor()[:3]) for b in recall_ax.patches] == ["#2ca02c", "#d62728"]  # 1.0 ok, 0.6 < 0.8
    assert [b.get_width() for b in recall_ax.patches] == [1.0, 0.6]
    assert [to_hex(b.get_facecolor()[:3]) for b in fp_ax.patches] == ["#2ca02c", "#2ca02c"]  # 0 and 1.5 <= 2
    assert recall_ax.get_title() == "mean recall 0.8 (VALID needs ≥ 0.8)"
    assert fig.get_suptitle() == "detector Pelt: NOT VALID"
    # thresholds at the record's top level (as ValidityReport.to_dict writes them) win over params
    fig = plot_validity({**VALIDITY, "min_recall": 0.5})
    assert [to_hex(b.get_facecolor()[:3]) for b in fig.axes[0].patches] == ["#2ca02c", "#2ca02c"]


def test_activation_vs_weight_uses_both_spaces(report: tuple[Path, Path, str]) -> None:
    from dimscope.plot import plot_activation_vs_weight

    run, _, _ = report
    r = open_run(run)
    fig = plot_activation_vs_weight(r, "stable_rank", ["0"])
    act, wt = fig.axes[0].lines[0], fig.axes[1].lines[0]
    np.testing.assert_array_equal(act.get_ydata(), r.metric("stable_rank", "0").to_numpy())
    np.testing.assert_array_equal(wt.get_ydata(), r.metric("stable_rank", "0", space="weight").to_numpy())


def test_failing_and_missing_providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path / "run", steps=20, analysis=False)
    (tmp_path / "boom_provider.py").write_text("def report_section(run):\n    raise RuntimeError('planted failure')\n")
    (tmp_path / "broken_import_provider.py").write_text("import not_a_real_package_xyz\n")
    (tmp_path / "extra_provider.py").write_text(
        "from dimscope.report import ReportSection\n"
        "def report_section(run):\n    return ReportSection('Extra area', '<p>extra body</p>', order=65, anchor='extra')\n"
        "def nothing(run):\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from dimscope.report import write_report

    path = write_report(
        run,
        tmp_path / "out",
        analyze=False,
        providers=(
            "dimscope.report.core:transitions_section",
            "dimscope.report.core:validity_section",
            "dimscope.area_that_does_not_exist.report:report_section",
            "boom_provider:report_section",
            "broken_import_provider:report_section",
            "extra_provider:report_section",
            "extra_provider:nothing",
        ),
    )
    html = path.read_text()
    page = _Page()
    page.feed(html)
    ids = page.sections
    assert ids.index("transitions") < ids.index("extra") < ids.index("validity")  # sorted by order
    assert "error-section-provider-boom-provider-report-section" in ids
    assert "RuntimeError: planted failure" in html
    assert "not_a_real_package_xyz" in html  # a provider whose own import fails is reported, not skipped
    assert "area_that_does_not_exist" not in html  # a module that does not exist is skipped
    # a run without analysis says so rather than inventing marks
    assert "holds no phase, transition or alert events" in _section(html, "transitions")
    assert "No <code>transitions/validity</code> artifact" in _section(html, "validity")


def test_analyze_run_is_called_when_the_run_has_no_analysis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path / "run", steps=20, analysis=False)
    calls: list[Path] = []

    def analyze_run(path):  # type: ignore[no-untyped-def]
        calls.append(Path(path))
        with RunStore(path) as st:
            st.add_event(None, "phase", layer="2", metric="stable_rank", payload={"label": "expansion", "start": 0, "end": 18, "share_of_change": 1.0})

    fake = types.ModuleType("dimscope.analysis")
    fake.analyze_run = analyze_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dimscope.analysis", fake)
    from dimscope.report import write_report

    cheap = ("dimscope.report.core:transitions_section",)
    html = write_report(run, tmp_path / "a", providers=cheap).read_text()
    assert calls == [run]
    assert "<td class='txt'>expansion</td>" in _section(html, "transitions")
    write_report(run, tmp_path / "b", providers=cheap)  # the run now holds phases: not analysed again
    assert len(calls) == 1
    # the stored analysis is of another convention only (analyze --convention X): the report's is analysed
    with RunStore(run) as st:
        st.put_artifact("analysis/summary", {"conventions": ["probe/uncentered"], "primary": "probe/uncentered"})
    write_report(run, tmp_path / "b2", providers=cheap)
    assert len(calls) == 2
    with RunStore(run) as st:
        st.put_artifact("analysis/summary", {"conventions": [dimscope.open_run(run).default_convention]})
    write_report(run, tmp_path / "b3", providers=cheap)
    assert len(calls) == 2
    # without the analysis module the report is still written
    monkeypatch.setitem(sys.modules, "dimscope.analysis", None)
    run2 = make_run(tmp_path / "run2", steps=20, analysis=False)
    assert "holds no phase" in write_report(run2, tmp_path / "c", providers=cheap).read_text()
    # an analysis that raises becomes a visible note, the report is still written
    def failing(path):  # type: ignore[no-untyped-def]
        raise RuntimeError("analysis exploded")

    fake.analyze_run = failing  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dimscope.analysis", fake)
    html = write_report(run2, tmp_path / "d", providers=cheap).read_text()
    assert "RuntimeError: analysis exploded" in html and "<section id='transitions'>" in html


def test_cli_report_and_demo_write_the_report(report: tuple[Path, Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The command plumbing (the full rendering is tested above): one cheap provider keeps this fast."""
    import dimscope.report.html as report_html
    from dimscope.cli import main

    monkeypatch.setattr(report_html, "SECTION_PROVIDERS", ("dimscope.report.core:conventions_section",))
    run = report[0]
    assert main(["report", str(run), "--out", str(tmp_path / "cli"), "--no-analyze"]) == 0
    assert f"report: {tmp_path / 'cli' / 'report.html'}" in capsys.readouterr().out.replace("\n", "")
    assert "<section id='conventions'>" in (tmp_path / "cli" / "report.html").read_text()
    assert main(["report", str(tmp_path / "no_such_run")]) == 2
    assert "No dimscope run at" in capsys.readouterr().err
    demo = tmp_path / "demo"
    assert main(["demo", "--steps", "30", "--every", "10", "--run", str(demo)]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert f"report: {demo / 'report' / 'report.html'}" in out
    assert "every 10 optimizer steps, steps 0–20, 3 measurements" in (demo / "report" / "report.html").read_text()


def test_matplotlib_stays_out_of_the_training_path(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, torch
        import dimscope, dimscope.report
        from dimscope.report import ReportSection, SECTION_PROVIDERS
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        with dimscope.Tracker(m, probe=torch.randn(16, 4), every=1, run={str(tmp_path / 'r')!r}) as t:
            for s in range(3):
                t.step(s, loss=1.0)
        assert 'matplotlib' not in sys.modules, sorted(k for k in sys.modules if k.startswith('matplotlib'))
        import dimscope.plot
        assert 'matplotlib' not in sys.modules
        print('ok')
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(Path(dimscope.__file__).parents[1])})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_report_of_a_run_with_no_measurement_yet(tmp_path: Path) -> None:
    """A run opened but not yet measured (e.g. read while training starts) still gets a report that says so."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    tr = dimscope.Tracker(model, probe=torch.randn(10, 4), every=5, layers=["0"], run=str(tmp_path / "run"), background=False)
    tr.close()
    from dimscope.report import write_report

    html = write_report(tmp_path / "run", analyze=False).read_text()
    page = _Page()
    page.feed(html)
    assert page.sections == ["conventions", "transitions", "validity"]
    assert "no measurement stored yet" in html and page.images == []
    assert (tmp_path / "run" / "report" / "report.html").is_file()


def test_ceilings_of_a_run_without_stored_spectra_come_from_the_value_descriptions(tmp_path: Path) -> None:
    """spectra=None stores no eigenvalues, but every value is stored with n, d and the ceiling."""
    from dimscope.report.core import _ceilings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 30), nn.ReLU(), nn.Linear(30, 3))
    with dimscope.Tracker(model, probe=torch.randn(12, 4), every=1, layers=["0", "2"], run=str(tmp_path / "run"),
                          spectra=None, metrics=["stable_rank", "participation_ratio"], background=False) as tr:
        for step in range(3):
            tr.step(step, loss=1.0)
    rows = _ceilings(open_run(tmp_path / "run"), "probe/centered").set_index("layer")
    assert rows.loc["0", "d (features)"] == 30 and rows.loc["2", "d (features)"] == 3
    c = rows["ceiling min(n−1, d)"]
    assert c.loc["0"] == 11 and c.loc["2"] == 3  # layer 0 capped by the 12 probe rows, layer 2 by its width
    assert rows["eigenvalues stored"].tolist() == [0, 0]
    assert rows.loc["0", "max participation_ratio"] <= 11
