"""Write the self-contained HTML report of a run.

``write_report(run)`` collects :class:`~dimscope.report.ReportSection` objects from every provider in
:data:`~dimscope.report.SECTION_PROVIDERS` (imported lazily; a module that does not exist is
skipped; a provider that raises becomes a visible error note instead of stopping the report),
renders every figure to PNG once, writes the PNG files into the output folder and embeds the same
bytes in ``report.html`` as ``data:`` URIs. The page has inline CSS, no script and no external URL:
it opens from disk with no network request.
"""

from __future__ import annotations

import html
import importlib
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import SECTION_PROVIDERS, ReportSection, figure_to_png, png_data_uri

__all__ = ["write_report", "collect_sections", "render_html", "REPORT_NAME"]

REPORT_NAME = "report.html"

_CSS = """
:root { --fg: #1d1f21; --muted: #5f6368; --line: #dadce0; --accent: #1a73e8; --bad: #c5221f; --good: #188038; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--fg);
       margin: 0; background: #fafafa; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 1.2rem 2rem; }
header h1 { margin: 0 0 .3rem 0; font-size: 1.5rem; }
header p { margin: 0; color: var(--muted); }
nav ol { margin: .6rem 0 0 0; padding-left: 1.2rem; columns: 2; }
main { max-width: 1150px; margin: 0 auto; padding: 1rem 2rem 3rem; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 1rem 1.5rem; margin: 1.2rem 0; }
section h2 { margin-top: .2rem; border-bottom: 1px solid var(--line); padding-bottom: .3rem; }
h3 { margin-bottom: .3rem; }
figure { margin: .8rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: var(--muted); font-size: .8rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0 1rem; }
th, td { border: 1px solid var(--line); padding: .2rem .5rem; }
th { background: #f1f3f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f1f3f4; padding: 0 .2rem; border-radius: 3px; font-size: .85em; word-break: break-word; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem; }
dl.kv dt { font-weight: 600; color: var(--muted); }
dl.kv dd { margin: 0; }
.note { color: var(--muted); font-style: italic; }
.error { border-left: 4px solid var(--bad); background: #fce8e6; padding: .5rem 1rem; }
.error pre { white-space: pre-wrap; font-size: .75rem; }
.verdict { font-weight: 700; padding: 0 .4rem; border-radius: 3px; color: #fff; }
.verdict.valid { background: var(--good); }
.verdict.invalid { background: var(--bad); }
footer { color: var(--muted); font-size: .8rem; text-align: center; padding: 1rem; }
"""

_FIG_RE = re.compile(r"\{\{fig:([^{}]+)\}\}")


def _slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "section"


def _stem(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")
    return s or "figure"


def _error_section(title: str, exc: BaseException, order: int = 1000) -> ReportSection:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    body = (
        f"<div class='error'><p><b>{html.escape(title)}</b> failed: {html.escape(type(exc).__name__)}: "
        f"{html.escape(str(exc))}</p><details><summary>traceback</summary><pre>{html.escape(tb)}</pre></details></div>"
    )
    return ReportSection(f"Error: {title}", body, order=order, anchor="error-" + _slug(title))


def _as_sections(result: Any, provider: str) -> list[ReportSection]:
    if result is None:
        return []
    items = [result] if isinstance(result, ReportSection) else list(result)
    for it in items:
        if not isinstance(it, ReportSection):
            raise TypeError(f"Report provider {provider!r} returned {type(it).__name__}, expected ReportSection, a list of them, or None.")
    return items


def collect_sections(run: Any, providers: tuple[str, ...] | list[str] | None = None) -> list[ReportSection]:
    """Call every ``"module:function"`` provider on ``run``; returns their sections sorted by order.

    A provider whose module does not exist is skipped; one that fails to import or raises yields an
    error section (so the rest of the report is still written).
    """
    out: list[tuple[int, int, ReportSection]] = []
    k = 0
    for spec in providers if providers is not None else SECTION_PROVIDERS:
        mod_name, _, fn_name = spec.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
                continue  # that area is not installed / not built yet
            out.append((1000, k, _error_section(f"importing {spec}", e)))
            k += 1
            continue
        except Exception as e:  # noqa: BLE001 - a broken provider must not stop the report
            out.append((1000, k, _error_section(f"importing {spec}", e)))
            k += 1
            continue
        try:
            fn = getattr(module, fn_name or "report_section")
            sections = _as_sections(fn(run), spec)
        except Exception as e:  # noqa: BLE001
            sections = [_error_section(f"section provider {spec}", e)]
        for s in sections:
            out.append((s.order, k, s))
            k += 1
    out.sort(key=lambda t: (t[0], t[1]))
    return [s for _, _, s in out]


def _close(fig: Any) -> None:
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        try:
            plt.close(fig)
        except Exception:  # noqa: BLE001 - not a pyplot figure
            pass


def render_html(
    sections: list[ReportSection], *, title: str, subtitle: str = "", out: Path | None = None, dpi: int = 110
) -> str:
    """The report page for ``sections``. Each figure becomes a PNG (written to ``out`` when given)
    and an inline ``data:image/png;base64`` image where its section's html says ``{{fig:stem}}``;
    a figure not referenced is appended at the end of its section."""
    used_stems: set[str] = set()
    used_anchors: set[str] = set()
    toc, body = [], []
    for sec in sections:
        anchor = _slug(sec.anchor or sec.title)
        base, n = anchor, 2
        while anchor in used_anchors:
            anchor, n = f"{base}-{n}", n + 1
        used_anchors.add(anchor)
        rendered: dict[str, str] = {}
        for stem, fig in sec.figures.items():
            file_stem = _stem(stem)
            base_s, n = file_stem, 2
            while file_stem in used_stems:
                file_stem, n = f"{base_s}_{n}", n + 1
            used_stems.add(file_stem)
            png = figure_to_png(fig, dpi=dpi)
            _close(fig)
            if out is not None:
                (out / f"{file_stem}.png").write_bytes(png)
            rendered[stem] = (
                f"<figure id='fig-{html.escape(file_stem)}'><img src='{png_data_uri(png)}' alt='{html.escape(stem)}'>"
                f"<figcaption>{html.escape(file_stem)}.png</figcaption></figure>"
            )
        referenced: set[str] = set()

        def sub(m: re.Match[str]) -> str:
            key = m.group(1).strip()
            if key in rendered:
                referenced.add(key)
                return rendered[key]
            return f"<p class='error'>missing figure {html.escape(key)}</p>"

        fragment = _FIG_RE.sub(sub, sec.html)
        extra = "".join(v for k, v in rendered.items() if k not in referenced)
        toc.append(f"<li><a href='#{anchor}'>{html.escape(sec.title)}</a></li>")
        body.append(f"<section id='{anchor}'><h2>{html.escape(sec.title)}</h2>\n{fragment}\n{extra}</section>")
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        "<link rel='icon' href='data:,'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>"
        f"<nav><ol>{''.join(toc)}</ol></nav></header>\n<main>\n" + "\n".join(body) + "\n</main>\n"
        "<footer>dimscope report · self-contained: no script, no external resource</footer>\n</body>\n</html>\n"
    )


def _has_analysis(run: Any) -> bool:
    """Whether the run holds an analysis of the convention the report draws (its default): events,
    and no stored summary saying the latest analysis was of other conventions only."""
    if run.events("phase").empty and run.events("transition").empty:
        return False
    summary = run.artifact("analysis/summary", default=None)
    conv = run.default_convention
    if not isinstance(summary, dict) or conv not in run.conventions:  # nothing recorded under it: any analysis will do
        return True
    return conv in (summary.get("conventions") or [conv])


def _maybe_analyze(run: Any) -> ReportSection | None:
    """Run the transitions analysis first when it exists and the run holds none of its events (or
    only an analysis of other conventions than the one the report draws)."""
    if _has_analysis(run):
        return None
    try:
        from ..analysis import analyze_run  # type: ignore[attr-defined]
    except ImportError:
        return None
    except Exception as e:  # noqa: BLE001 - a broken analysis module must not stop the report
        return _error_section("importing dimscope.analysis", e, order=5)
    try:
        analyze_run(run.path)
    except Exception as e:  # noqa: BLE001 - the report still shows what the run holds
        return _error_section("the transitions analysis (dimscope.analysis.analyze_run)", e, order=5)
    return None


def write_report(
    run: Any,
    out: str | os.PathLike[str] | None = None,
    *,
    analyze: bool = True,
    dpi: int = 110,
    providers: tuple[str, ...] | list[str] | None = None,
) -> Path:
    """Write ``report.html`` (self-contained) and one PNG per figure into ``out``; returns the HTML path.

    Parameters
    ----------
    run:
        A :class:`~dimscope.store.Run` or a run directory.
    out:
        The output folder (created); default ``<run>/report``.
    analyze:
        When the run holds no ``"phase"`` or ``"transition"`` events, or only an analysis of other
        conventions than the run's default (which the report draws), and ``dimscope.analysis.analyze_run``
        exists, run it first with its defaults (it stores its results in the run, in place of any earlier analysis).
    dpi:
        Resolution of the PNG files.
    providers:
        ``"module:function"`` section providers; default :data:`~dimscope.report.SECTION_PROVIDERS`.
    """
    from .._validation import check_int
    from ..store import Run

    check_int(dpi, "dpi", min_value=20, owner="write_report")
    if isinstance(run, Run):
        return _write(run, out, analyze=analyze, dpi=dpi, providers=providers)
    with Run(run) as r:
        return _write(r, out, analyze=analyze, dpi=dpi, providers=providers)


def _write(r: Any, out: str | os.PathLike[str] | None, *, analyze: bool, dpi: int, providers: Any) -> Path:
    out_dir = Path(out) if out is not None else r.path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[ReportSection] = []
    if analyze:
        note = _maybe_analyze(r)
        if note is not None:
            notes.append(note)
    sections = sorted(notes + collect_sections(r, providers), key=lambda s: s.order)
    man = r.manifest
    cfg = man.get("config") or {}
    title = f"dimscope report — {r.path.name}"
    subtitle = " · ".join(
        x
        for x in (
            f"{man.get('model_class', '')} ({man.get('n_parameters', '?')} parameters)" if man.get("model_class") else "",
            f"recipe {cfg['recipe']}" if cfg.get("recipe") else "",
            f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        )
        if x
    )
    page = render_html(sections, title=title, subtitle=subtitle, out=out_dir, dpi=dpi)
    path = out_dir / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path
