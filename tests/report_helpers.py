"""A tiny training run for the report tests, and the report page taken apart with html.parser."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

from exemplar.config import load_config
from exemplar.quickstart import tokenizer_path
from exemplar.train.finetune import finetune

SCRIPT_ROW = "<script>alert(1)</script>"
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 3072,
}


LONG_WORD = "abcdefghij" * 20  # far over max_length 64: dropped, and counted by reason


def write_rows(path: Path, n: int = 16, too_long: int = 0) -> Path:
    """Reverse-a-word rows; the first one carries markup that the report must show as text."""
    words = [SCRIPT_ROW] + [f"abc{i}" for i in range(n - 1)] + [LONG_WORD] * too_long
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Reverse: {w}"},
                {"role": "assistant", "content": w[::-1]},
            ]
        }
        for w in words
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(folder: Path, **train) -> dict:
    return {
        "model": {"from_config": TINY_LLAMA},
        "tokenizer": tokenizer_path(),
        "data": {
            # a weight: the prepared set is an index mapping over the rows, which the statistics follow
            "train": [{"path": str(write_rows(folder / "rows.jsonl", too_long=1)), "weight": 1.5}],
            "eval": [{"path": str(write_rows(folder / "eval_rows.jsonl", 4))}],
            "cache_dir": str(folder / "cache"),
        },
        "max_length": 64,
        "train": {"micro_batch_size": 4, "max_steps": 4, "lr": 1e-3, "eval_every": 2, **train},
        "output_dir": str(folder / "out"),
    }


def train_tiny(folder: Path, **train) -> dict:
    return finetune(load_config(None, **run_config(folder, **train)), progress=False)


class Page(HTMLParser):
    """The parts of the page the tests look at: section ids, images, scripts, text per section."""

    def __init__(self, html: str):
        super().__init__()
        self.sections: dict[str, list[str]] = {}
        self.images: list[str] = []
        self.scripts = 0
        self._section: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs.get("id")
            self.sections[self._section] = []
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._section is not None:
            self.sections[self._section].append(data)

    def text(self, section: str) -> str:
        return "".join(self.sections[section])


def decoded_png_sizes(sources: list[str]) -> list[tuple[int, int]]:
    """Width and height of each data-URI image, decoded by Pillow (matplotlib's own dependency)."""
    from PIL import Image

    sizes = []
    for src in sources:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix), src[:40]
        sizes.append(Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :]))).size)
    return sizes


# Put first in <head> of a test copy of a page: records script errors, alerts, images that fail to
# load, and on load writes every image's naturalWidth and all of these into <pre id=probe>.
PROBE = """<script>
window.__errors = []; window.__alerts = [];
window.onerror = function (message) { window.__errors.push(String(message)); };
window.addEventListener("error", function (e) {
  if (e.target && e.target.tagName === "IMG") window.__errors.push("image failed: " + e.target.alt);
}, true);
window.alert = function (message) { window.__alerts.push(String(message)); };
window.addEventListener("load", function () {
  var images = Array.from(document.images).map(function (i) {
    return {alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth};
  });
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({images: images, errors: window.__errors, alerts: window.__alerts});
  document.body.appendChild(pre);
});
</script>"""


def chromium_binary() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def load_in_chromium(chromium: str, page: Path, work: Path) -> tuple[dict, str, Path]:
    """Open a probed copy of `page` in headless Chromium: (probe result, dumped DOM, screenshot)."""
    import re
    import subprocess
    from html import unescape

    probed = work / "probed.html"
    probed.write_text(
        page.read_text(encoding="utf-8").replace("<head>", "<head>\n" + PROBE, 1), encoding="utf-8"
    )
    flags = [
        chromium,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",  # root in a container has no sandbox to enter
        f"--user-data-dir={work / 'profile'}",
        "--virtual-time-budget=10000",  # scripts and image decoding run before the dump
        "--window-size=1100,6000",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=180, check=True
    ).stdout
    shot = work / "screenshot.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", probed.as_uri()], capture_output=True, timeout=180, check=True
    )
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run: the page never finished loading\n" + dom[-2000:]
    return json.loads(unescape(found.group(1))), dom, shot
