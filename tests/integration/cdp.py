"""A small Chrome DevTools Protocol client for browser tests: Debian's headless Chromium,
driven over one websocket (``websockets``' sync client, installed with uvicorn).

No browser download, no Playwright/Selenium: ``Browser.launch()`` starts the system
``chromium`` on a fresh profile bound to 127.0.0.1, ``Browser.new_page()`` opens a tab, and
``Page`` navigates, evaluates JavaScript, types, clicks and takes PNG screenshots.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--mute-audio",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


class CDPError(RuntimeError):
    pass


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, proc: subprocess.Popen, ws_url: str, profile: Path) -> None:
        self.proc, self.profile = proc, profile
        self.ws = connect(ws_url, max_size=64 * 2**20, open_timeout=30)
        self._ids = itertools.count(1)
        self._events: list[dict[str, Any]] = []

    @classmethod
    def launch(
        cls, binary: str | None = None, width: int = 1440, height: int = 960, timeout: float = 60
    ) -> Browser:
        binary = binary or find_chromium()
        if not binary:
            raise CDPError("no chromium on PATH")
        profile = Path(tempfile.mkdtemp(prefix="cdp-profile-"))
        proc = subprocess.Popen(
            [
                binary,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.time() + timeout
        assert proc.stderr is not None
        seen = []
        while time.time() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                # keep draining stderr so a chatty browser never blocks on a full pipe
                import threading

                threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
                return cls(proc, m.group(1), profile)
        proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
        raise CDPError("chromium did not start: " + "".join(seen[-20:]))

    # -- protocol ------------------------------------------------------------------------

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = 60,
    ) -> dict[str, Any]:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise CDPError(f"{method}: no answer in {timeout}s")
            data = json.loads(self.ws.recv(timeout=left))
            if data.get("id") == msg_id:
                if "error" in data:
                    raise CDPError(f"{method}: {data['error']}")
                return data.get("result", {})
            if "method" in data:
                self._events.append(data)

    def wait_event(
        self, method: str, *, session: str | None = None, timeout: float = 30, since: int = 0
    ) -> dict[str, Any]:
        """The first event ``method`` (for ``session``) buffered at index >= ``since``."""
        deadline = time.time() + timeout
        i = since
        while True:
            while i < len(self._events):
                ev = self._events[i]
                i += 1
                if ev["method"] == method and (session is None or ev.get("sessionId") == session):
                    return ev
            left = deadline - time.time()
            if left <= 0:
                raise CDPError(f"no {method} in {timeout}s")
            try:
                data = json.loads(self.ws.recv(timeout=min(left, 1.0)))
            except TimeoutError:
                continue
            if "method" in data:
                self._events.append(data)

    def new_page(self, width: int = 1440, height: int = 900) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        page = Page(self, target, session)
        for domain in ("Page.enable", "Runtime.enable"):
            page.send(domain)
        page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        return page

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    def __init__(self, browser: Browser, target_id: str, session: str) -> None:
        self.browser, self.target_id, self.session = browser, target_id, session

    def send(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 60
    ) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session, timeout=timeout)

    def goto(self, url: str, timeout: float = 60) -> None:
        mark = len(self.browser._events)
        result = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise CDPError(f"navigate {url}: {result['errorText']}")
        if not result.get("loaderId"):  # same-document (#fragment) navigation: no load event
            return
        self.browser.wait_event(
            "Page.loadEventFired", session=self.session, timeout=timeout, since=mark
        )

    def eval(self, expression: str, timeout: float = 30) -> Any:
        """Evaluate JS and return its value as JSON data (a DOM node comes back as ``True``)."""
        wrapped = f"(async () => {{ const v = await ({expression}); return v instanceof Node ? true : v; }})()"
        r = self.send(
            "Runtime.evaluate",
            {"expression": wrapped, "returnByValue": True, "awaitPromise": True},
            timeout=timeout,
        )
        if "exceptionDetails" in r:
            raise CDPError(f"JS error in {expression[:80]!r}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 30, interval: float = 0.25) -> Any:
        """Poll a JS expression until it is truthy; return its value."""
        deadline = time.time() + timeout
        last: Any = None
        while time.time() < deadline:
            try:
                last = self.eval(expression)
            except CDPError as exc:
                last = exc
            if last and not isinstance(last, CDPError):
                return last
            time.sleep(interval)
        raise CDPError(
            f"timed out after {timeout}s waiting for {expression[:200]!r} (last: {last!r})"
        )

    def url(self) -> str:
        return str(self.eval("location.href"))

    def text(self) -> str:
        return str(self.eval("document.body ? document.body.innerText : ''"))

    def click_at(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    def click(self, js_element: str, timeout: float = 20) -> None:
        """Click the element a JS expression returns, with real mouse events at its centre; if
        something covers it there (a toast, an overlay), with ``element.click()`` instead."""
        box = self.wait_for(
            f"(() => {{ const el = {js_element}; if (!el) return null; el.scrollIntoView({{block: 'center'}});"
            " const r = el.getBoundingClientRect(); if (!r.width) return null;"
            " const x = r.x + r.width / 2, y = r.y + r.height / 2, top = document.elementFromPoint(x, y);"
            " return [x, y, !!top && (el === top || el.contains(top))]; })()",
            timeout=timeout,
        )
        if box[2]:
            self.click_at(box[0], box[1])
        else:
            self.eval(f"({js_element}).click()")

    def type_into(self, js_element: str, text: str, *, clear: bool = True) -> None:
        """Focus an input, select its content, and type ``text`` as keyboard input (React sees it)."""
        self.click(js_element)
        if clear:
            self.eval(
                f"(() => {{ const el = {js_element}; el.focus(); el.select && el.select(); }})()"
            )
            self.send(
                "Input.dispatchKeyEvent",
                {
                    "type": "keyDown",
                    "key": "Backspace",
                    "code": "Backspace",
                    "windowsVirtualKeyCode": 8,
                },
            )
            self.send(
                "Input.dispatchKeyEvent",
                {
                    "type": "keyUp",
                    "key": "Backspace",
                    "code": "Backspace",
                    "windowsVirtualKeyCode": 8,
                },
            )
        self.send("Input.insertText", {"text": text})

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": min(size["height"], 6000),
                    "scale": 1,
                },
            )
        data = self.send("Page.captureScreenshot", params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
