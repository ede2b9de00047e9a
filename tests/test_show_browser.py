"""show.html in a real headless Chromium, driven over the Chrome DevTools Protocol: a real mouse click on a patch
recomputes every similarity map, the page's maps equal the Python ones within HTML_TOLERANCE, and the drawn maps
change on screen. Skipped (with the reason) where no Chromium binary or no websocket-client is installed."""
from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib", reason="show needs matplotlib (the viz extra)")
websocket = pytest.importorskip("websocket", reason="driving Chromium needs websocket-client (the test extra)")

from flexpredict_zoo.features import extract_features  # noqa: E402
from flexpredict_zoo.show import HTML_TOLERANCE, show  # noqa: E402

MODEL = "flexpredict_vit_m4_32.digits_stop"  # shipped weights: 32x32 inputs, 8x8 patches
CHROMIUM = next((path for path in (os.environ.get("CHROMIUM"), shutil.which("chromium"),
                                   shutil.which("chromium-browser"), shutil.which("google-chrome"))
                 if path), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary found (apt-get install chromium, or set "
                                                         "CHROMIUM=/path/to/chrome)")


class DevTools:
    """A page of a headless Chromium, spoken to over the DevTools Protocol (one websocket, one call at a time)."""

    def __init__(self, profile: Path):
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
             "--window-size=1400,1200", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError(f"{CHROMIUM} did not start a DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(t for t in targets if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        call_id = next(self.ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self) -> np.ndarray:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        if hasattr(self, "socket"):
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _digits(folder: Path, count: int = 4) -> Path:
    from flexpredict_zoo.train.data import DigitsDataset
    heldout = DigitsDataset("heldout")
    folder.mkdir(parents=True)
    for i in range(count):
        ink = ((1 - heldout.pixels[i, 0].clamp(0, 1)) * 255).round().byte().numpy()
        Image.fromarray(ink, "L").convert("RGB").save(folder / f"digit_{i}_class_{int(heldout.labels[i])}.png")
    return folder


def _expected_maps(tokens: torch.Tensor, image: int, row: int, col: int, cols: int) -> np.ndarray:
    """Cosine of every patch to one, from the extractor's float32 tokens (torch's own cosine_similarity)."""
    query = tokens[image, row * cols + col]
    return torch.nn.functional.cosine_similarity(tokens, query.view(1, 1, -1), dim=-1).numpy()


def test_clicking_a_patch_redraws_every_similarity_map(tmp_path):
    images = _digits(tmp_path / "digits")
    paths = show(MODEL, images, tmp_path / "out")
    tokens = extract_features(MODEL, images, patch_tokens=True).patch_tokens
    rows = cols = 8
    browser = DevTools(tmp_path / "profile")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=paths["html"].resolve().as_uri())
        deadline = time.monotonic() + 60
        while not browser.evaluate("document.readyState === 'complete' && !!window.showState "
                                   "&& window.showState.maps.length > 0"):
            assert time.monotonic() < deadline, "the page did not finish loading"
            time.sleep(0.1)
        before = json.loads(browser.evaluate("JSON.stringify(window.showState)"))
        # the page opens on the default patch: the centre of image 0, as the contact sheet
        assert (before["image"], before["row"], before["col"]) == (0, 4, 4) and before["clicks"] == 0
        np.testing.assert_allclose(np.array(before["maps"]), _expected_maps(tokens, 0, 4, 4, cols).reshape(4, -1),
                                   atol=HTML_TOLERANCE, rtol=0)
        shot_before = browser.screenshot()

        # a real mouse event at the centre of patch (row 1, col 6) of image 2's input picture
        box = browser.evaluate("(() => { const r = document.querySelectorAll('.card')[2].querySelector('.pane')"
                               ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()")
        left, top, width, height = box
        browser.click(left + (6 + 0.5) * width / cols, top + (1 + 0.5) * height / rows)
        after = json.loads(browser.evaluate("JSON.stringify(window.showState)"))
        assert (after["image"], after["row"], after["col"], after["clicks"]) == (2, 1, 6, 1)
        js_maps = np.array(after["maps"])
        expected = _expected_maps(tokens, 2, 1, 6, cols).reshape(4, -1)
        error = float(np.abs(js_maps - expected).max())
        assert error <= HTML_TOLERANCE, error
        assert js_maps[2, 1 * cols + 6] == pytest.approx(1.0, abs=HTML_TOLERANCE)
        assert float(np.abs(js_maps - np.array(before["maps"])).max()) > 0.1  # a different patch, other maps

        # on screen: every map canvas changed, and its pixels follow the new map (the chosen patch is the
        # brightest colour of the scale, yellow in viridis)
        shot_after = browser.screenshot()
        for n in range(4):
            rect = browser.evaluate(f"(() => {{ const r = document.getElementById('map-{n}').getBoundingClientRect();"
                                    f" return [r.left, r.top, r.width, r.height]; }})()")
            x0, y0, w, h = (int(round(v)) for v in rect)
            region = (slice(y0 + 2, y0 + h - 2), slice(x0 + 2, x0 + w - 2))
            changed = np.abs(shot_after[region].astype(int) - shot_before[region].astype(int)).max(axis=-1) > 30
            assert changed.mean() > 0.2, (n, changed.mean())
        x0, y0, w, h = browser.evaluate("(() => { const r = document.getElementById('map-2')"
                                        ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()")
        red, green, blue = shot_after[int(y0 + 1.5 * h / rows), int(x0 + 6.5 * w / cols)]
        assert red > 200 and green > 200 and blue < 100, (red, green, blue)
    finally:
        browser.close()
