"""report.html's data without a browser: per-image scores, which images are shown, escaping, run records."""

import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from git_qlora_main import main
from scripts import report
from utils.evaluation import compute_caption_metrics, compute_per_image_scores

HOSTILE = ["<img src=x onerror=alert(1)>", "</script><script>alert(2)</script>", "a \"quoted\" & 'odd' caption"]


class ElementCounter(HTMLParser):
    """Start tags by name, the attributes of each, and the page's text, as a browser's parser would see them."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.attrs, self.text = {}, [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attrs.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _rows(page: str) -> list[dict]:
    return [attrs for tag, attrs in ElementCounter(page).attrs if tag == "tr" and attrs.get("class") == "row"]


def test_per_image_scores_equal_pycocoevalcap_on_normalised_text():
    predictions = {"a.jpg": "A red circle, on the LEFT.", "b.jpg": "a blue square", "c.jpg": "one green star!",
                   "d.jpg": ""}
    references = {"a.jpg": ["a red circle on the left", "The circle is red."], "b.jpg": ["a blue square on the right"],
                  "c.jpg": ["a green star", "one star, green"], "d.jpg": ["a yellow triangle"]}
    # Normalised by hand: lowercase, no punctuation.
    gts = {"a.jpg": ["a red circle on the left", "the circle is red"], "b.jpg": ["a blue square on the right"],
           "c.jpg": ["a green star", "one star green"], "d.jpg": ["a yellow triangle"]}
    res = {"a.jpg": ["a red circle on the left"], "b.jpg": ["a blue square"], "c.jpg": ["one green star"], "d.jpg": [""]}
    _, bleu = Bleu(4).compute_score(gts, res, verbose=0)
    _, cider = Cider().compute_score(gts, res)

    scores = compute_per_image_scores(predictions, references, caption_tokenizer="simple")
    assert list(scores) == list(gts)
    for i, name in enumerate(gts):
        assert scores[name]["bleu_4"] == pytest.approx(bleu[3][i], abs=1e-12), name
        assert scores[name]["cider"] == pytest.approx(cider[i], abs=1e-12), name
    assert scores["a.jpg"]["bleu_4"] == pytest.approx(1.0)  # identical to a reference after normalisation
    assert scores["d.jpg"] == {"cider": 0.0, "bleu_4": pytest.approx(0.0, abs=1e-6), "rouge_l": 0.0}
    # Same image set and document frequencies as the corpus metric: the per-image values average to it.
    corpus = compute_caption_metrics(predictions, references, caption_tokenizer="simple")
    assert sum(s["cider"] for s in scores.values()) / len(scores) == pytest.approx(corpus["cider"], abs=1e-12)


def test_gallery_shows_worst_best_and_a_seeded_sample():
    scores = {f"{i:03d}.jpg": float((i * 37) % 300) for i in range(300)}  # a permutation of 0..299
    shown = report.select_gallery(scores, worst=100, best=100, sample=50, seed=3)
    ranked = sorted(scores, key=scores.get)
    assert len(shown) == len(set(shown)) == 250
    assert set(ranked[:100]) <= set(shown) and set(ranked[-100:]) <= set(shown)
    assert [scores[n] for n in shown] == sorted(scores[n] for n in shown)  # worst first
    assert report.select_gallery(scores, 100, 100, 50, seed=3) == shown
    assert report.select_gallery(scores, 100, 100, 50, seed=4) != shown  # the sample moves with the seed
    few = {"b.jpg": 2.0, "a.jpg": 2.0, "c.jpg": 0.5}
    assert report.select_gallery(few) == ["c.jpg", "a.jpg", "b.jpg"]  # all, worst first, ties by name


def test_ticks_are_round_and_cover_the_range():
    assert report.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert report.nice_ticks(3.1, 7.9) == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    ticks = report.nice_ticks(2.5, 2.5)
    assert ticks[0] < 2.5 < ticks[-1]


def test_plot_points_sit_where_their_values_are():
    svg = report.svg_line_plot([("loss", [(0, 4.0), (10, 2.0), (20, 1.0)])], "Loss", "step", "loss")
    circles = [(float(x), float(y)) for x, y in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', svg)]
    assert len(circles) == 3
    (x0, y0), (x1, y1), (x2, y2) = circles
    assert x1 - x0 == pytest.approx(x2 - x1, abs=0.11)  # equal steps, equal spacing
    assert (y1 - y0) == pytest.approx(2 * (y2 - y1), abs=0.11)  # a drop of 2 is twice a drop of 1
    assert y0 < y1 < y2  # higher loss is drawn higher up
    assert ">step<" in svg and ">loss<" in svg and 'class="tick"' in svg
    assert report.svg_line_plot([("empty", [])], "t", "x", "y") == ""


def _write_image(path: Path, color) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (400, 300), color).save(path)
    return path


def test_hostile_captions_and_names_are_text_and_bad_images_get_a_placeholder(tmp_path):
    images = tmp_path / "imgs"
    _write_image(images / "ok.png", "red")
    (images / "broken.png").write_bytes(b"not a png")
    hostile_name = "<b>x</b>.png"
    predictions = {"ok.png": HOSTILE[0], "broken.png": HOSTILE[1], "missing.png": HOSTILE[2], hostile_name: "a cat"}
    references = {name: ["a red square", HOSTILE[1]] for name in predictions}
    rows, scores, _ = report.build_gallery(predictions, references)
    data = report.ReportData("t", ["sub <script>"], [("m", [("x", {"cider": 1.0})])], rows, len(scores))
    page = report.render_report(data, [images])
    parsed = ElementCounter(page)
    assert parsed.tags["script"] == 1 and parsed.tags.get("b", 0) == 0
    assert parsed.tags["img"] == 1  # the one readable image; no element from a caption
    assert sum(1 for tag, a in parsed.attrs if tag == "div" and a.get("class") == "missing") == 3
    text = "".join(parsed.text)
    for caption in HOSTILE + [hostile_name]:
        assert caption in text
    assert "onerror" not in "".join(str(a) for _, a in parsed.attrs)
    thumb = next(a for tag, a in parsed.attrs if tag == "img")
    assert thumb["src"].startswith("data:image/jpeg;base64,")
    # Nothing is fetched from anywhere: the only URLs are data: URIs.
    assert all(a.get(k, "data:").startswith("data:") for _, a in parsed.attrs for k in ("src", "href"))


def test_thumbnails_are_small_and_never_outside_the_folder(tmp_path):
    _write_image(tmp_path / "root" / "big.png", "blue")
    _write_image(tmp_path / "secret.png", "green")
    uri, _ = report.thumbnail_data_uri(report.find_image("big.png", [tmp_path / "root"]))
    assert uri and len(uri) < 4000
    assert report.find_image("../secret.png", [tmp_path / "root"]) is None
    assert report.thumbnail_data_uri(None) == (None, "image file not found")


def test_val_predictions_keep_the_other_column_when_one_is_updated(tmp_path):
    report.save_val_predictions(tmp_path, before={"a.jpg": "a red, \"odd\" circle", "b.jpg": "a square"})
    report.save_val_predictions(tmp_path, after={"a.jpg": "the circle is red"})  # e.g. after --resume
    with open(tmp_path / "val_predictions.csv", newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle)) == [["image_name", "before", "after"], ["a.jpg", 'a red, "odd" circle',
                                            "the circle is red"], ["b.jpg", "a square", ""]]


def _eval_args(run: Path, data_dir: Path) -> list[str]:
    return ["--eval", "--test_dir", str(data_dir / "test"), "--captions_file", str(data_dir / "captions.csv"),
            "--output_dir", str(run), "--fgd_model", "none", "--java", "none", "--num_workers", "0", "--max_new_tokens", "8"]


def test_training_keeps_records_and_eval_report_shows_them(trained_run, data_dir):
    with open(trained_run / "val_predictions.csv", newline="", encoding="utf-8") as handle:
        val = list(csv.DictReader(handle))
    assert len(val) == 8 and all(row["before"] and row["after"] for row in val)
    history = json.loads((trained_run / "train_history.json").read_text())
    assert any("loss" in e for e in history) and any("eval_loss" in e for e in history)
    trained = (trained_run / "report.html").read_text(encoding="utf-8")  # written by --train
    assert len(_rows(trained)) == 8 and "before training" in trained and "base model: " in trained

    assert main(_eval_args(trained_run, data_dir)) == 0
    page = (trained_run / "report.html").read_text(encoding="utf-8")
    with open(trained_run / "eval_predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))[1:]
    predictions = {r[0]: r[1] for r in rows}
    references = {r[0]: [c for c in r[2:] if c] for r in rows}
    tokenizer = json.loads((trained_run / "eval_results.json").read_text())["caption_tokenizer"]
    expected = compute_per_image_scores(predictions, references, tokenizer)
    shown = _rows(page)
    assert len(shown) == 8 and {r["data-name"] for r in shown} == set(predictions)
    for row in shown:
        assert float(row["data-cider"]) == pytest.approx(expected[row["data-name"]]["cider"], rel=1e-5, abs=1e-9)
        assert float(row["data-bleu4"]) == pytest.approx(expected[row["data-name"]]["bleu_4"], rel=1e-5, abs=1e-9)
    ciders = [float(r["data-cider"]) for r in shown]
    assert ciders == sorted(ciders)  # worst first without JavaScript too
    parsed = ElementCounter(page)
    assert parsed.tags["img"] == 8 and parsed.tags["svg"] >= 2  # thumbnails; loss and metric plots
    text = " ".join(parsed.text)
    for row in val:  # the base model's caption beside the fine-tuned one
        assert f"base model: {row['before']}" in text
    assert "Showing 8 of 8" in text and "base model" in text and "Validation images during training" in text


def test_predictions_file_report_and_a_failing_report_does_not_fail_eval(data_dir, tmp_path, monkeypatch, caplog):
    preds = tmp_path / "preds.csv"
    names = sorted(p.name for p in (data_dir / "test").iterdir() if p.suffix == ".png")
    with open(preds, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("image_name", "caption")] + [(f"test/{n}", "a red circle") for n in names])
    out = tmp_path / "out"
    args = ["--eval", "--predictions_file", str(preds), "--captions_file", str(data_dir / "captions.csv"),
            "--output_dir", str(out), "--fgd_model", "none", "--java", "none"]
    assert main(args) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert ElementCounter(page).tags["img"] == len(names)  # found beside the captions file
    assert "<h2>Training</h2>" not in page  # no run records here

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "render_report", broken)
    (out / "report.html").unlink()
    assert main(args + ["--output_dir", str(tmp_path / "out2")]) == 0
    assert (tmp_path / "out2" / "eval_results.json").is_file() and not (tmp_path / "out2" / "report.html").exists()
    assert "disk on fire" in caplog.text


def test_eval_of_a_base_model_writes_a_report_without_run_records(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "base_eval"
    assert main(["--eval", "--model_name", str(tiny_model_dir), "--test_dir", str(data_dir / "test"),
                 "--captions_file", str(data_dir / "captions.csv"), "--output_dir", str(out),
                 "--fgd_model", "none", "--java", "none", "--num_workers", "0", "--max_new_tokens", "4"]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    parsed = ElementCounter(page)
    assert len(_rows(page)) == 8 and parsed.tags["img"] == 8
    assert "base model:" not in page and "<h2>Training</h2>" not in page  # nothing to compare with or plot
