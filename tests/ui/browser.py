"""Headless Chromium driven over the DevTools protocol (CDP), for checking what the Prefect UI shows.

No browser-automation package: Chromium's own `--remote-debugging-port` and the `websockets` client that Prefect
already depends on. Every wait has a deadline, and `Browser.close` ends the browser's whole process group.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                "chromium (or `make ui-check`), or set FVLM_CHROMIUM to a Chromium binary")


def find_chromium() -> str | None:
    """FVLM_CHROMIUM when set (None when it names no executable file), else the first Chromium on PATH."""
    configured = os.environ.get("FVLM_CHROMIUM")
    if configured:
        return configured if os.path.isfile(configured) and os.access(configured, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_reason() -> str:
    """Why no Chromium was found, and how to get one (the skip reason of the browser tests)."""
    configured = os.environ.get("FVLM_CHROMIUM")
    if configured:
        return f"FVLM_CHROMIUM={configured} is not an executable file; unset it or point it at a Chromium binary"
    return f"no Chromium on PATH ({', '.join(CHROMIUM_NAMES)}); install it: {INSTALL_HINT}"


# What the single-page app has rendered so far: its text, and every <img> with its natural (decoded) size.
PROBE_JS = r"""
(() => {
  const imgs = [...document.querySelectorAll('img')].map(i => {
    const box = i.getBoundingClientRect();
    return {src: (i.currentSrc || i.src).slice(0, 40), complete: i.complete,
            naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
            shownWidth: Math.round(box.width), shownHeight: Math.round(box.height)};
  });
  return {url: location.href, readyState: document.readyState,
          text: document.body ? document.body.innerText : '', imgs};
})()
"""


@dataclass
class Page:
    """A snapshot of the page: its URL, visible text and images."""

    url: str
    text: str
    imgs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def pictures(self, min_width: int = 1) -> list[dict[str, Any]]:
        """Embedded PNGs (data: URIs) that finished loading and decoded to at least `min_width` pixels."""
        return [i for i in self.imgs if i["src"].startswith("data:image/png") and i["complete"]
                and i["naturalWidth"] >= min_width]


class CDP:
    """A minimal DevTools protocol client on one page target's websocket."""

    def __init__(self, ws_url: str, timeout_s: float = 10):
        from websockets.sync.client import connect

        # max_size=None: a screenshot is several MB of base64, over the client's 1 MiB default
        self.ws = connect(ws_url, max_size=None, open_timeout=timeout_s)
        self.ids = itertools.count(1)

    def send(self, method: str, params: dict | None = None, timeout_s: float = 30) -> dict:
        call = next(self.ids)
        self.ws.send(json.dumps({"id": call, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer to {method} within {timeout_s} s")
            message = json.loads(self.ws.recv(timeout=left))
            if message.get("id") == call:  # anything else is an event, which we do not need
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str, timeout_s: float = 15) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout_s)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self.ws.close()


class Browser:
    """Headless Chromium with one page, a fixed viewport and a private profile in `work_dir`."""

    def __init__(self, binary: str, work_dir: Path, width: int = 1440, height: int = 1000, start_timeout_s: float = 60,
                 failure_dir: Path | None = None):
        self.size = (width, height)
        self.failure_dir = failure_dir  # where a page that never showed what it must is photographed
        args = [binary, "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--hide-scrollbars", "--mute-audio", "--force-color-profile=srgb",
                f"--user-data-dir={work_dir / 'chromium-profile'}", "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.cdp: CDP | None = None
        try:
            self.cdp = CDP(self._page_target(self._devtools_url(start_timeout_s)))
            self.cdp.send("Page.enable")
            self.cdp.send("Runtime.enable")
            self.set_viewport(width, height)
        except BaseException:
            self.close()
            raise

    def _devtools_url(self, timeout_s: float) -> str:
        """Chromium prints `DevTools listening on ws://127.0.0.1:PORT/...` on stderr; a thread reads it (and keeps
        draining stderr, so that the browser never blocks on a full pipe)."""
        lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stderr is not None
        stderr = self.proc.stderr

        def drain() -> None:
            for raw in stderr:
                lines.put(raw.decode(errors="replace"))

        threading.Thread(target=drain, daemon=True).start()
        deadline, seen = time.monotonic() + timeout_s, []
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            found = re.search(r"DevTools listening on (ws://\S+)", line)
            if found:
                return found.group(1)
        raise RuntimeError(f"Chromium's DevTools did not come up within {timeout_s} s (exit {self.proc.poll()}):\n"
                           + "".join(seen[-20:]))

    @staticmethod
    def _page_target(devtools_url: str) -> str:
        port = re.search(r":(\d+)/", devtools_url).group(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            return next(t for t in json.load(answer) if t["type"] == "page")["webSocketDebuggerUrl"]

    def set_viewport(self, width: int, height: int) -> None:
        self.cdp.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def open(self, url: str, texts: tuple[str, ...] = (), pictures: int = 0, min_width: int = 1,
             timeout_s: float = 60, settle_s: float = 0.5) -> Page:
        """Navigate to `url` and wait for what it must show (see `wait_for`)."""
        self.cdp.send("Page.navigate", {"url": url})
        return self.wait_for(texts, pictures, min_width, timeout_s, settle_s)

    def wait_for(self, texts: tuple[str, ...] = (), pictures: int = 0, min_width: int = 1,
                 timeout_s: float = 60, settle_s: float = 0.5) -> Page:
        """Wait until every one of `texts` is on the page and at least `pictures` embedded PNGs have decoded to
        `min_width` pixels or wider, then `settle_s` more for what is drawn on canvases (a run's timeline).
        Raises TimeoutError saying what is missing."""
        started = time.monotonic()
        deadline = started + timeout_s
        page = None
        while time.monotonic() < deadline:
            time.sleep(0.25)
            try:
                state = self.cdp.evaluate(PROBE_JS)
            except RuntimeError:  # the page's context went away mid-navigation
                continue
            page = Page(state["url"], state["text"], state["imgs"])
            if state["readyState"] == "complete" and all(t in page.text for t in texts) and \
                    len(page.pictures(min_width)) >= pictures:
                time.sleep(settle_s)  # late layout (fonts, panels, canvases) before a screenshot
                page = Page(**{k: v for k, v in self.cdp.evaluate(PROBE_JS).items() if k != "readyState"})
                page.seconds = time.monotonic() - started
                return page
        missing = [t for t in texts if page is None or t not in page.text]
        shown = page.pictures() if page else []
        if self.failure_dir is not None:
            self.screenshot(self.failure_dir / f"timeout-{time.strftime('%H%M%S')}.png")
        raise TimeoutError(f"{page.url if page else 'the page'} after {timeout_s} s: texts missing {missing}; "
                           f"{len(shown)} embedded PNGs loaded (wanted {pictures} of >= {min_width} px: {shown}); "
                           f"page text starts {(page.text if page else '')[:400]!r}")

    def click(self, selector: str) -> None:
        """Click the first element matching the CSS `selector`; AssertionError when there is none."""
        found = self.cdp.evaluate("""((s) => { const e = document.querySelector(s);
          if (!e) return false; e.click(); return true; })(%s)""" % json.dumps(selector))
        assert found, f"nothing on the page matches {selector}"

    def scroll_to_text(self, text: str) -> None:
        """Scroll the deepest element holding `text` to the top of the viewport (the app scrolls inner panes)."""
        self.cdp.evaluate("""((t) => { const els = [...document.querySelectorAll('body *')]
          .filter(e => e.children.length === 0 && (e.textContent || '').includes(t));
          if (els.length) els[0].scrollIntoView({block: 'start'}); })(%s)""" % json.dumps(text))
        time.sleep(0.4)

    def screenshot(self, path: Path) -> Path:
        answer = self.cdp.send("Page.captureScreenshot", {"format": "png"}, timeout_s=60)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(answer["data"]))
        return path

    def close(self) -> None:
        if self.cdp is not None:
            try:
                self.cdp.send("Browser.close", timeout_s=5)
            except Exception:  # noqa: BLE001 - the browser may be gone already; the process group goes below
                pass
            try:
                self.cdp.close()
            except Exception:  # noqa: BLE001
                pass
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        try:  # renderer and GPU helper processes share the browser's session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
