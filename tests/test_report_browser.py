"""The report opens in headless Chromium from disk with no console error and no network request.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4, NUL-separated JSON; no extra Python package needed). The page's console
messages, uncaught exceptions, log entries (failed resource loads) and every request it makes are
collected; a control page with a planted console error, a missing file and an external image proves
the collector sees each kind of problem. The screenshot stays in the test's tmp_path.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from test_report import REPORT_SECTIONS, make_run  # noqa: F401 (shared fixture builder)

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (Debian package `chromium`; .ci/run installs it)")


class _Browser:
    """A minimal DevTools-protocol client over --remote-debugging-pipe."""

    def __init__(self, exe: str, user_data_dir: Path) -> None:
        r_cmd, w_cmd = os.pipe()  # we write commands -> chromium reads fd 3
        r_out, w_out = os.pipe()  # chromium writes fd 4 -> we read
        args = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "--window-size=1280,2000", "about:blank"]

        def child_fds() -> None:
            # copy above 10 first, so that neither source is clobbered when it already sits on 3 or 4
            # (close-on-exec copies; dup2 makes 3 and 4 inheritable, every other fd of ours is not)
            a, c = fcntl.fcntl(r_cmd, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(w_out, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(a, 3)
            os.dup2(c, 4)

        self.proc = subprocess.Popen(
            args, preexec_fn=child_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False
        )
        os.close(r_cmd)
        os.close(w_out)
        self.w, self.r = w_cmd, r_out
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any] | None:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
        self.next_id += 1
        mid = self.next_id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m is None:
                raise TimeoutError(f"no answer to {method} within {timeout} s")
            if m.get("id") == mid:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        for m in self.events:
            if m.get("method") == method:
                return m
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline)
            if m is None:
                raise TimeoutError(f"no {method} event within {timeout} s")
            self.events.append(m)
            if m.get("method") == method:
                return m

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (m := self._read_message(deadline)) is not None:
            self.events.append(m)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.w)
        os.close(self.r)


def open_page(path: Path, tmp_path: Path, tag: str) -> dict[str, Any]:
    """Load ``path`` in headless Chromium; returns its problems, requests, DOM facts and screenshot path."""
    exe = _chromium()
    b = _Browser(exe, tmp_path / f"profile-{tag}")  # a fresh --user-data-dir for every page
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            b.send(f"{domain}.enable", session=sid)
        b.events.clear()
        b.send("Page.navigate", {"url": path.resolve().as_uri()}, session=sid)
        b.wait_event("Page.loadEventFired")
        b.drain(1.0)
        facts = b.send(
            "Runtime.evaluate",
            {
                "expression": "JSON.stringify({title: document.title, sections: Array.from(document.querySelectorAll('section')).map(s => s.id),"
                " images: document.images.length, decoded: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length,"
                " height: document.documentElement.scrollHeight})",
                "returnByValue": True,
            },
            session=sid,
        )["result"]["value"]
        shot = b.send("Page.captureScreenshot", {"format": "png"}, session=sid)["data"]
        png = tmp_path / f"{tag}.png"
        png.write_bytes(base64.b64decode(shot))
        events = [e for e in b.events if e.get("sessionId") == sid]
    finally:
        b.close()
    problems: list[str] = []
    requests: list[str] = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
            problems.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            problems.append("exception: " + str(p.get("exceptionDetails", {}).get("exception", {}).get("description") or p.get("exceptionDetails", {}).get("text")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
            problems.append(f"log.{p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed":
            problems.append(f"load failed: {p.get('errorText')}")
        if m == "Network.requestWillBeSent":
            requests.append(p["request"]["url"])
    return {"problems": problems, "requests": requests, "facts": json.loads(facts), "screenshot": png}


def _external(urls: list[str]) -> list[str]:
    return [u for u in urls if not (u.startswith("file:") or u.startswith("data:") or u == "about:blank")]


def test_browser_harness_sees_planted_problems(tmp_path: Path) -> None:
    """Control: the collector reports a console error, an exception, a missing file and an external request."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><head><link rel='icon' href='data:,'><title>bad</title></head><body><p>x</p>"
        "<img src='missing.png'><img src='http://127.0.0.1:9/x.png'>"
        "<script>console.error('planted-error'); undefinedFunction();</script></body></html>"
    )
    got = open_page(page, tmp_path, "bad")
    text = "\n".join(got["problems"])
    assert "planted-error" in text
    assert "undefinedFunction" in text
    assert any("missing.png" in u for u in got["requests"])
    assert _external(got["requests"]) == ["http://127.0.0.1:9/x.png"]
    assert got["facts"]["images"] == 2 and got["facts"]["decoded"] == 0


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", steps=60)
    from dimscope.report import write_report

    path = write_report(run, tmp_path / "out", analyze=False)
    got = open_page(path, tmp_path, "report")
    assert got["problems"] == [], got["problems"]
    # the page makes no request except loading itself (images are data: URIs)
    assert _external(got["requests"]) == [], got["requests"]
    assert [u for u in got["requests"] if u.startswith("file:")] == [path.resolve().as_uri()]
    facts = got["facts"]
    assert facts["title"].startswith("dimscope report")
    for anchor in REPORT_SECTIONS:
        assert anchor in facts["sections"]
    assert facts["images"] >= 8 and facts["decoded"] == facts["images"]
    assert facts["height"] > 3000  # a laid-out page, not an empty one
    from PIL import Image

    with Image.open(got["screenshot"]) as im:
        assert im.size[0] >= 1000
        colours = im.convert("L").getextrema()
    assert colours[1] - colours[0] > 100  # something was drawn
