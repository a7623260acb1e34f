"""The training report renders whatever the series hold: constant, tiny (0 to 8.3e-17, 1e-17), NaN/inf points,
a single point, empty. Each case goes through write_training_report and is rendered in headless Chromium."""

import json
import math
import re

import pytest
from PIL import Image

from scripts import report
from tests.test_report_browser import Dom, _console_lines, _run_chromium

NAN, INF = float("nan"), float("inf")
CASES = {
    "constant": [2.0, 2.0, 2.0, 2.0],
    "tiny_range": [0.0, 8.3e-17, 4e-17, 8.3e-17],
    "tiny_constant": [1e-17, 1e-17, 1e-17],
    "nan_and_inf": [NAN, 1.0, INF, 0.5, -INF],
    "single_point": [3.0],
    "empty": [],
}
COORDINATES = ("x", "y", "x1", "x2", "y1", "y2", "cx", "cy", "width", "height")


def _write_run(run_dir, values):
    """A run folder whose records hold `values` as the training loss, the validation loss and CIDEr-D at
    steps 1..n; written with NaN/Infinity literals, as the Trainer's trainer_state.json can hold them."""
    run_dir.mkdir()
    images = run_dir / "val"
    images.mkdir()
    for name, color in (("a.png", (200, 30, 30)), ("b.png", (30, 30, 200))):
        Image.new("RGB", (40, 30), color).save(images / name)
    history = [{"step": i + 1, "loss": v} for i, v in enumerate(values)]
    history += [{"step": i + 1, "eval_loss": v, "eval_cider": v} for i, v in enumerate(values)]
    (run_dir / report.HISTORY_NAME).write_text(json.dumps(history), encoding="utf-8")
    metrics = {"global_step": len(values)}
    if values:
        metrics.update(before={"cider": values[0], "bleu_4": values[0]}, after={"cider": values[-1], "bleu_4": values[-1]})
    (run_dir / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (run_dir / report.VAL_PREDICTIONS_NAME).write_text("image_name,before,after\na.png,a dog,a red square\n"
                                                       "b.png,a dog,a blue square\n", encoding="utf-8")
    return images, {"a.png": ["a red square"], "b.png": ["a blue square", "a square"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_with_degenerate_series_renders_its_plots(case, tmp_path, caplog):
    values = CASES[case]
    images, references = _write_run(tmp_path / "run", values)
    path = report.write_training_report(tmp_path / "run", images, references)
    assert path is not None and not [r for r in caplog.records if "Could not" in r.getMessage()]
    page = path.read_text(encoding="utf-8")
    finite = [v for v in values if math.isfinite(v)]
    ends = [v for v in values[:1] + values[-1:] if math.isfinite(v)]  # before and after training
    expected_plots = (2 + bool(ends)) if finite else 0  # loss, CIDEr-D, BLEU-4 (before/after only), or none
    assert page.count('<svg class="plot"') == expected_plots

    result = _run_chromium(tmp_path, path.as_uri(), "--dump-dom")
    assert _console_lines(result.stderr) == []
    dom = Dom(result.stdout)
    assert dom.tags("body")[0].get("data-ready") == "1" and len(dom.rows) == 2  # the page's script ran
    assert len(dom.tags("svg")) == expected_plots
    shapes = [attrs for tag, attrs in dom.elements if tag in ("line", "rect", "circle", "polyline", "text")]
    for attrs in shapes:
        for key in COORDINATES:
            if key in attrs:
                assert math.isfinite(float(attrs[key])), (key, attrs)
        for number in re.findall(r"[-\w.+]+", attrs.get("points", "").replace(",", " ")):
            assert math.isfinite(float(number)), attrs
    assert not re.search(r"\b(NaN|Infinity|inf|nan)\b", " ".join(str(a) for a in shapes))
    circles = [(float(a["cx"]), float(a["cy"])) for a in dom.tags("circle")]
    if finite:
        # Every finite point is drawn inside its plot area (left 64, top 46, 300 x 168 px), the others not at all.
        # loss plot: training and validation loss; CIDEr-D: the evaluations and before/after; BLEU-4: before/after
        assert len(circles) == 3 * len(finite) + 2 * len(ends)
        assert all(64 - 0.1 <= x <= 364 + 0.1 and 46 - 0.1 <= y <= 214 + 0.1 for x, y in circles)


def test_ticks_stay_distinct_and_cover_any_finite_range():
    for low, high in [(0, 8.3e-17), (1e-17, 1e-17), (0, 0), (1.0, 1.0 + 1e-16), (-5, -5), (1e6, 1e6 + 1e-4),
                      (-3, 2), (1e300, 1.5e300), (-1e307, 1e307)]:
        ticks = report.nice_ticks(low, high)
        assert len(ticks) >= 2 and all(a < b for a, b in zip(ticks, ticks[1:])), (low, high, ticks)
        assert ticks[0] <= low and ticks[-1] >= high and all(math.isfinite(t) for t in ticks)
        labels = report.tick_labels(ticks)
        assert len(set(labels)) == len(labels), (low, high, labels)
    assert report.nice_ticks(0, 8.3e-17) == [0.0, 2e-17, 4e-17, 6e-17, 8e-17, 1e-16]
    with pytest.raises(ValueError):
        report.nice_ticks(0.0, NAN)
