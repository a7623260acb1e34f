"""report.html in a real browser: headless Chromium renders it from disk, offline, and hostile captions stay text.

Needs the `chromium` program (Debian: `apt-get install -y chromium`); .ci/run installs it. Without it the
test fails with that instruction instead of passing silently.
"""

import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from git_qlora_main import main

HOSTILE_NAME = "<img src=x onerror=alert(3)>.png"
COLORS = {"red": (220, 20, 20), "blue": (20, 40, 220), "green": (20, 180, 40)}
SHAPES = ("circle", "square", "star")
HOSTILE_CAPTIONS = {"blue_square.png": "<img src=x onerror=alert(1)>",
                    "green_star.png": "</script><script>document.title='pwned'</script>"}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
    "--virtual-time-budget=5000", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-default-apps", "--no-first-run", "--disable-extensions",
]


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("No headless browser for the report test: install it: apt-get install -y chromium "
                "(Debian/Ubuntu; .ci/run does this), then rerun.")


class Dom(HTMLParser):
    """Elements (tag, attributes) in document order, and the text inside each gallery row."""

    def __init__(self, text: str):
        super().__init__()
        self.elements, self.rows, self._row_depth = [], [], 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag == "tr" and attrs.get("class") == "row":
            self.rows.append({**attrs, "text": ""})
            self._row_depth = 1
        elif self._row_depth and tag == "tr":
            self._row_depth += 1

    def handle_endtag(self, tag):
        if tag == "tr" and self._row_depth:
            self._row_depth -= 1

    def handle_data(self, data):
        if self._row_depth:
            self.rows[-1]["text"] += data

    def tags(self, name):
        return [attrs for tag, attrs in self.elements if tag == name]


def _scene_files() -> dict[str, tuple[str, str]]:
    scenes = {f"{c}_{s}.png": (c, s) for c in COLORS for s in SHAPES}
    scenes[HOSTILE_NAME] = ("red", "circle")
    return scenes


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> Path:
    """report.html from `--eval --predictions_file` on 10 pictures, two captions and one file name hostile."""
    folder = tmp_path_factory.mktemp("browser")
    scenes = _scene_files()
    for name, (color, _) in scenes.items():
        Image.new("RGB", (200, 150), COLORS[color]).save(folder / name)
    with open(folder / "refs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_name", "caption"])
        for name, (color, shape) in scenes.items():
            writer.writerows([(name, f"a {color} {shape}"), (name, f"the {shape} is {color}")])
    # Right, half right and wrong captions, so the per-image scores differ.
    with open(folder / "preds.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_name", "caption"])
        for i, (name, (color, shape)) in enumerate(scenes.items()):
            caption = [f"a {color} {shape}", f"a {color} thing", "a picture"][i % 3]
            writer.writerow((name, HOSTILE_CAPTIONS.get(name, caption)))
    out = folder / "eval"
    assert main(["--eval", "--predictions_file", str(folder / "preds.csv"), "--captions_file",
                 str(folder / "refs.csv"), "--output_dir", str(out), "--fgd_model", "none", "--java", "none"]) == 0
    return out / "report.html"


def _run_chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    command = [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _console_lines(stderr: str) -> list[str]:
    # Every console message (errors, uncaught exceptions, CSP refusals) is logged as "...:CONSOLE:<line>] ...".
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _page_requests(net_log: Path) -> list[str]:
    """URLs of network requests the page itself made (the browser's own background requests left out)."""
    raw = net_log.read_text(encoding="utf-8").rstrip().rstrip(",")
    try:
        log = json.loads(raw)
    except ValueError:  # a log cut short lacks its closing brackets
        log = json.loads(raw + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [event["params"]["url"] for event in log["events"]
            if event["type"] == start_job and "file://" in json.dumps(event["params"].get("network_isolation_key", ""))]


def test_report_renders_offline_sorts_filters_and_keeps_hostile_captions_as_text(report_file, tmp_path):
    net_log = tmp_path / "net.json"
    result = _run_chromium(tmp_path, report_file.as_uri() + "#sort=cider-desc", f"--log-net-log={net_log}",
                           "--dump-dom")
    dom = Dom(result.stdout)
    assert _console_lines(result.stderr) == []  # no errors, no blocked loads, nothing logged
    assert _page_requests(net_log) == []
    body = dom.tags("body")[0]
    assert body.get("data-ready") == "1" and body.get("data-sort") == "cider-desc"  # the script ran to the end

    assert len(dom.rows) == 10
    thumbnails = [img for img in dom.tags("img") if img.get("class") == "thumb"]
    assert len(thumbnails) == len(dom.tags("img")) == 10  # one per picture, none from a caption or a name
    assert all(img["src"].startswith("data:image/jpeg;base64,") for img in thumbnails)
    assert all(attrs.get(key, "data:").startswith("data:") for _, attrs in dom.elements for key in ("src", "href"))
    assert len(dom.tags("script")) == 1 and not any("onerror" in attrs for _, attrs in dom.elements)
    assert "pwned" not in result.stdout.split("</title>")[0]
    ciders = [float(row["data-cider"]) for row in dom.rows]
    assert ciders == sorted(ciders, reverse=True) and ciders[0] > ciders[-1]  # sorted best first by the script
    texts = {row["data-name"]: row["text"] for row in dom.rows}
    assert HOSTILE_NAME in texts and HOSTILE_NAME in texts[HOSTILE_NAME]
    for name, caption in HOSTILE_CAPTIONS.items():
        assert caption in texts[name]
    assert "a red circle" in texts["red_circle.png"] and "the circle is red" in texts["red_circle.png"]


def test_report_search_hides_rows_that_do_not_match(report_file, tmp_path):
    result = _run_chromium(tmp_path, report_file.as_uri() + "#sort=name-asc&q=green", "--dump-dom")
    dom = Dom(result.stdout)
    assert _console_lines(result.stderr) == []
    shown = [row["data-name"] for row in dom.rows if "hidden" not in row]
    assert shown == ["green_circle.png", "green_square.png", "green_star.png"]  # file name order, the rest hidden
    assert len(dom.rows) == 10


def test_report_screenshot_shows_the_thumbnails(report_file, tmp_path):
    shot = tmp_path / "report.png"
    _run_chromium(tmp_path, report_file.as_uri(), f"--screenshot={shot}", "--window-size=1280,2000",
                  "--hide-scrollbars")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    pixels = list(image.getdata())
    # The pictures are flat red, green and blue; their thumbnails must show up as blocks of those colours.
    for color in COLORS.values():
        near = sum(1 for p in pixels if all(abs(a - b) < 30 for a, b in zip(p, color)))
        assert near > 2000, (color, near)
    assert len(set(pixels)) > 50  # text and plots rendered, not a blank page
