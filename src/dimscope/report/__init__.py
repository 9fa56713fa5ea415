"""The self-contained HTML report.

Sections come from *providers*: functions ``report_section(run) -> ReportSection | None`` that each
analysis area defines in its own module (listed in :data:`SECTION_PROVIDERS`). A provider returns
None when the run holds nothing for it, so a section appears only when the run has its data.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ReportSection", "SECTION_PROVIDERS", "figure_to_png", "png_data_uri", "write_report"]


@dataclass
class ReportSection:
    """One section of the report.

    ``html`` is a fragment (no <html>/<body>); ``figures`` maps a file stem to a matplotlib Figure,
    written as ``<stem>.png`` beside the report and embedded inline where the fragment says
    ``{{fig:<stem>}}``. ``order`` sorts sections (lower first).
    """

    title: str
    html: str
    figures: dict[str, Any] = field(default_factory=dict)
    order: int = 100
    anchor: str = ""


#: "module:function" providers, imported lazily; a missing module is skipped.
SECTION_PROVIDERS: tuple[str, ...] = (
    "dimscope.report.core:report_sections",
    "dimscope.transitions.report:report_section",
    "dimscope.jacobian.report:report_section",
    "dimscope.staircase.report:report_section",
    "dimscope.analysis.precursor_report:report_section",
    "dimscope.experiments.report:report_section",
)


def figure_to_png(fig: Any, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def __getattr__(name: str) -> Any:
    # ``write_report`` lives in report/html.py; imported lazily so that importing this package stays light.
    if name == "write_report":
        from .html import write_report

        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
