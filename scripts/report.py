"""RUN/report.html: one self-contained page with the metrics, a captioned image gallery and training plots."""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from PIL import Image

from utils.dataset_utils import load_image, read_text
from utils.evaluation import PROTOCOLS, align_names, compute_caption_metrics, compute_per_image_scores
from utils.io import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

REPORT_NAME = "report.html"
VAL_PREDICTIONS_NAME = "val_predictions.csv"  # image_name,before,after: validation captions of --train
HISTORY_NAME = "train_history.json"  # the Trainer's log_history at the end of --train
# The gallery shows the worst, the best and a random sample of the rest, so the file stays small.
GALLERY_WORST, GALLERY_BEST, GALLERY_RANDOM = 100, 100, 50
THUMBNAIL_PX = 128  # longest side of an embedded thumbnail
JPEG_QUALITY = 80
TABLE_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice", "rouge_1", "rouge_2", "fgd",
              "clip_score", "ref_clip_score", "num_images", "num_references")
# Caption statistics (utils/caption_stats.py), shown in their own table.
STAT_LABELS = {"num_distinct_captions": "distinct captions", "distinct_caption_share": "share of distinct captions",
               "distinct_1": "distinct-1", "distinct_2": "distinct-2", "vocabulary_size": "vocabulary (words)",
               "mean_caption_length": "mean length (words)", "copied_from_training": "copied from training captions"}
METRIC_LABELS = {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "meteor": "METEOR", "spice": "SPICE",
                 "rouge_l": "ROUGE-L", "cider": "CIDEr-D", "rouge_1": "ROUGE-1", "rouge_2": "ROUGE-2",
                 "fgd": "FGD (lower is better)", "num_images": "images", "num_references": "references",
                 "clip_score": "CLIP-S", "ref_clip_score": "RefCLIP-S", **STAT_LABELS}
# Nothing may leave the page: every image is a data: URI, styles and the script are inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


# ---------------------------------------------------------------------------
# Records --train keeps for the report
# ---------------------------------------------------------------------------


def read_val_predictions(path: Path) -> dict[str, dict[str, str]]:
    """{image_name: {"before": caption, "after": caption}} from val_predictions.csv; {} when absent."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows = csv.DictReader(io.StringIO(read_text(path), newline=""))
    return {row["image_name"]: {"before": row.get("before") or "", "after": row.get("after") or ""}
            for row in rows if row.get("image_name")}


def save_val_predictions(run_dir: Path, before: dict[str, str] | None = None, after: dict[str, str] | None = None) -> None:
    """Update RUN/val_predictions.csv with the captions given; a column not given keeps its old values (--resume)."""
    path = Path(run_dir) / VAL_PREDICTIONS_NAME
    rows = read_val_predictions(path)
    for column, captions in (("before", before), ("after", after)):
        for name, caption in (captions or {}).items():
            rows.setdefault(name, {"before": "", "after": ""})[column] = caption
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_name", "before", "after"])
    writer.writerows([name, rows[name]["before"], rows[name]["after"]] for name in sorted(rows))
    write_text_atomic(path, buffer.getvalue())


def save_train_history(run_dir: Path, log_history: list[dict]) -> None:
    write_json_atomic(Path(run_dir) / HISTORY_NAME, list(log_history))


def read_train_history(run_dir: Path) -> list[dict]:
    """The run's log history: RUN/train_history.json, else the newest checkpoint's trainer_state.json."""
    run_dir = Path(run_dir)
    def step(state: Path) -> int:
        suffix = state.parent.name.rsplit("-", 1)[-1]
        return int(suffix) if suffix.isdigit() else -1

    checkpoints = sorted((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json"), key=step, reverse=True)
    candidates = [run_dir / HISTORY_NAME, *checkpoints]
    for path in candidates:
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                logger.warning("Report: %s is not valid JSON; skipped.", path)
                continue
            history = data.get("log_history", []) if isinstance(data, dict) else data
            return [entry for entry in history if isinstance(entry, dict)]
    return []


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------
# What the report shows (pure)
# ---------------------------------------------------------------------------


def select_gallery(scores: dict[str, float], worst: int = GALLERY_WORST, best: int = GALLERY_BEST,
                   sample: int = GALLERY_RANDOM, seed: int = 0) -> list[str]:
    """Names to show, worst first: the `worst` lowest, the `best` highest and `sample` random others."""
    ranked = sorted(scores, key=lambda name: (scores[name], name))
    if len(ranked) <= worst + best + sample:
        return ranked
    middle = ranked[worst:len(ranked) - best]
    chosen = set(ranked[:worst]) | set(ranked[len(ranked) - best:]) | set(random.Random(seed).sample(middle, sample))
    return [name for name in ranked if name in chosen]


@dataclass
class GalleryRow:
    name: str
    prediction: str
    references: list[str]
    cider: float | None  # None without references
    bleu_4: float | None
    base: str | None = None  # the base model's caption, when the run has it
    base_cider: float | None = None
    clip_score: float | None = None  # CLIP-S (utils/clip_score.py), when computed
    base_clip_score: float | None = None
    meteor: float | None = None  # METEOR of the caption, when METEOR ran


@dataclass
class ReportData:
    """Everything the page shows, built from captions, references and the run's records."""

    title: str
    subtitle: list[str]
    tables: list[tuple]  # (heading, [(column label, metrics)]) or (heading, columns, {metric: change interval})
    rows: list[GalleryRow]
    num_scored: int
    plots: list[str] = field(default_factory=list)  # inline SVG
    notes: list[str] = field(default_factory=list)


def build_gallery(predictions: dict[str, str], references: dict[str, list[str]],
                  base: dict[str, str] | None = None, seed: int = 0, caption_tokenizer: str = "auto",
                  scores: dict[str, dict] | None = None,
                  clip_scores: dict[str, float] | None = None) -> tuple[list[GalleryRow], dict[str, dict], dict | None]:
    """Rows to show (worst CIDEr-D first), every image's scores, and the base model's metrics on the same images.

    The base model's scores are computed only when it captioned every scored image, so both use the same
    CIDEr-D document frequencies and are comparable. `scores`: per-image scores already computed (with METEOR,
    by evaluate_captions); all use the evaluation's caption_tokenizer. Without references the rows are ranked by CLIP-S.
    """
    clip_scores = clip_scores or {}
    if not references:
        return _reference_free_gallery(predictions, base or {}, clip_scores, seed), {n: {} for n in predictions}, None
    scores = scores or compute_per_image_scores(predictions, references, caption_tokenizer)
    base = {name: caption for name, caption in (base or {}).items() if name in scores}
    base_scores, base_metrics = {}, None
    if base and set(base) == set(scores):
        base_scores = compute_per_image_scores(base, references, caption_tokenizer)
        base_metrics = compute_caption_metrics(base, {name: references[name] for name in base}, caption_tokenizer)
    shown = select_gallery({name: s["cider"] for name, s in scores.items()}, seed=seed)
    rows = [GalleryRow(name, predictions[name], list(references[name]), scores[name]["cider"], scores[name]["bleu_4"],
                       base.get(name), base_scores.get(name, {}).get("cider"), clip_scores.get(name),
                       meteor=scores[name].get("meteor"))
            for name in shown]
    return rows, scores, base_metrics


def _reference_free_gallery(predictions: dict[str, str], base: dict[str, str], clip_scores: dict[str, float],
                            seed: int) -> list[GalleryRow]:
    """Rows of captions without references: worst CLIP-S first (file name order when there is no CLIP-S)."""
    ranking = {name: clip_scores.get(name, 0.0) for name in predictions}
    return [GalleryRow(name, predictions[name], [], None, None, base.get(name), None, clip_scores.get(name))
            for name in select_gallery(ranking, seed=seed)]


# ---------------------------------------------------------------------------
# Plots: a small inline-SVG line chart
# ---------------------------------------------------------------------------

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


# A range narrower than this share of its values' size is float noise around one value (e.g. 1.0 vs 1.0 + 1e-16).
RELATIVE_NOISE = 1e-12


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """At least two distinct, increasing round tick values (1, 2, 5 x 10^k apart) covering [low, high].

    Any finite input works: a constant (or noise-wide) range is widened around its value, and a tiny one such
    as 0 to 8.3e-17 gets ticks 2e-17 apart (rounding to fixed decimals made them all 0 and the plot divided
    by zero). Non-finite bounds are an error: the caller leaves NaN/inf points out.
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"nice_ticks needs finite bounds, got {low!r} and {high!r}")
    low, high = min(low, high), max(low, high)
    size = max(abs(low), abs(high))
    if high - low <= size * RELATIVE_NOISE:  # also 0 == 0
        pad = size * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = high / count - low / count  # not (high - low) / count, which can overflow
    exponent = math.floor(math.log10(raw))
    multiple, exponent = next(((m, exponent) for m in (1, 2, 5) if m * 10.0 ** exponent >= raw), (1, exponent + 1))
    step = multiple * 10.0 ** exponent
    # Ticks are integer multiples k of the step, rounded to the step's own decimals (0.30000000000000004 -> 0.3).
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    digits = max(0, -exponent)
    ticks = [round(k * multiple * 10.0 ** exponent, digits) if digits else float(k * multiple * 10 ** exponent)
             for k in range(first, max(last, first + 1) + 1)]
    return [t for i, t in enumerate(ticks) if i == 0 or t > ticks[i - 1]]


def tick_labels(ticks: list[float]) -> list[str]:
    """Labels that tell neighbouring ticks apart: 4 significant digits, more when the ticks need them."""
    for digits in range(4, 18):
        labels = [f"{t:.{digits}g}" for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def _label(value: float) -> str:
    return f"{value:.4g}"


def _finite_points(points) -> list[tuple[float, float]]:
    """(x, y) pairs as floats, sorted; NaN, inf and values that are not numbers are left out."""
    kept = []
    for point in points:
        try:
            x, y = float(point[0]), float(point[1])
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            kept.append((x, y))
    return sorted(kept)


def svg_line_plot(series: list[tuple[str, list[tuple[float, float]]]], title: str, x_label: str, y_label: str,
                  width: int = 380, height: int = 260) -> str:
    """An SVG line chart (axes, ticks, labels, legend) of [(label, [(x, y), ...])]; "" when there is nothing to draw."""
    series = [(label, _finite_points(points)) for label, points in series]
    series = [(label, points) for label, points in series if points]
    if not series:
        return ""
    xs = [x for _, points in series for x, _ in points]
    ys = [y for _, points in series for _, y in points]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    left, right, top, bottom = 64, 16, 46, 46
    legend_x = left
    plot_w, plot_h = width - left - right, height - top - bottom

    def share(value, ticks):  # 0..1 along the axis; halved first, so a wide range cannot overflow to inf
        return (value / 2 - ticks[0] / 2) / (ticks[-1] / 2 - ticks[0] / 2)

    def px(x):
        return left + share(x, x_ticks) * plot_w

    def py(y):
        return top + plot_h - share(y, y_ticks) * plot_h

    esc = html.escape
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
             f'<text x="{width / 2}" y="18" text-anchor="middle" class="plot-title">{esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for t, text in zip(x_ticks, tick_labels(x_ticks)):
        parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#666"/>'
                     f'<text x="{px(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle" class="tick">{text}</text>')
    for t, text in zip(y_ticks, tick_labels(y_ticks)):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                     f'<line x1="{left - 4}" x2="{left}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#666"/>'
                     f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" class="tick">{text}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle" class="axis-label">{esc(x_label)}</text>'
                 f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle" '
                 f'class="axis-label">{esc(y_label)}</text>')
    for i, (label, points) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        if len(points) > 1:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{coords}"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{3 if len(points) < 40 else 1.5}" fill="{color}">'
                  f'<title>{esc(label)}: step {_label(x)}, {_label(y)}</title></circle>' for x, y in points]
        # Legend in a row between the title and the plot, where no line can run under it.
        parts.append(f'<rect x="{legend_x}" y="{top - 13}" width="12" height="3" fill="{color}"/>'
                     f'<text x="{legend_x + 16}" y="{top - 8}" class="legend">{esc(label)}</text>')
        legend_x += 16 + 7 * len(label) + 18
    parts.append("</svg>")
    return "".join(parts)


def build_plots(history: list[dict], training: dict) -> list[str]:
    """Loss over steps, and caption metrics at each evaluation (plus before and after training)."""
    def points(key):
        return [(e["step"], e[key]) for e in history if isinstance(e.get(key), (int, float)) and "step" in e]

    plots = [svg_line_plot([("training loss", points("loss")), ("validation loss", points("eval_loss"))],
                           "Loss", "optimizer step", "cross-entropy")]
    last_step = training.get("global_step") or max((e.get("step", 0) for e in history), default=0)
    for keys, y_label in ((("cider",), "CIDEr-D"), (("bleu_4", "rouge_l"), "BLEU-4 / ROUGE-L")):
        series = []
        for key in keys:
            pts = points(f"eval_{key}")
            if isinstance((training.get("before") or {}).get(key), (int, float)):
                pts.insert(0, (0, training["before"][key]))
            if isinstance((training.get("after") or {}).get(key), (int, float)):
                pts.append((last_step, training["after"][key]))
            series.append((METRIC_LABELS[key], pts))
        plots.append(svg_line_plot(series, f"Validation {y_label}", "optimizer step", y_label))
    return [plot for plot in plots if plot]


# ---------------------------------------------------------------------------
# Thumbnails
# ---------------------------------------------------------------------------


def find_image(name: str, roots: list) -> Path | Image.Image | None:
    """The first root/name that is a file inside its root; names reaching outside a root are never opened.
    A root may also be an image source (e.g. a `datasets` split: utils/hf_datasets.py), which gives the image."""
    for root in roots:
        if hasattr(root, "load"):
            image, _ = root.load(name)
            if image is not None:
                return image
            continue
        root = Path(root).resolve()
        path = (root / name).resolve()
        if path.is_relative_to(root) and path.is_file():
            return path
    return None


def thumbnail_data_uri(path: Path | None, size: int = THUMBNAIL_PX) -> tuple[str | None, str]:
    """(JPEG data URI of the image shrunk to `size` px, "") or (None, why); never raises."""
    if path is None:
        return None, "image file not found"
    image, reason = (path, None) if isinstance(path, Image.Image) else load_image(path)
    if image is None:
        return None, reason or "unreadable"
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), ""


# ---------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1280px}
.tables{display:flex;flex-wrap:wrap;gap:8px 40px} h3{font-size:15px;margin:8px 0 4px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;margin:2px 0} .note{color:#666;font-size:12px} .warn{color:#b42318;font-weight:600}
table.metrics{border-collapse:collapse;margin:4px 0}
table.metrics td,table.metrics th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
table.metrics td:first-child,table.metrics th:first-child{text-align:left}
.up{color:#1a7f37} .down{color:#b42318}
.plots svg{margin:0 10px 10px 0;border:1px solid #eee;background:#fff}
.plot-title{font-size:14px;font-weight:600} .tick{font-size:11px;fill:#444} .axis-label{font-size:12px;fill:#222}
.legend{font-size:12px}
.controls{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ddd;z-index:1}
.controls input{width:260px}
table.gallery{border-collapse:collapse;width:100%}
table.gallery td,table.gallery th{padding:6px;border-bottom:1px solid #eee;vertical-align:top;text-align:left}
table.gallery td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img.thumb{display:block;border-radius:3px;background:#f4f4f4}
.missing{width:96px;height:96px;display:flex;align-items:center;justify-content:center;background:#f4f4f4;
  color:#999;font-size:11px;text-align:center}
.name{font-family:ui-monospace,monospace;font-size:12px;color:#555;word-break:break-all}
.ci{color:#888;font-size:12px} .pred{font-weight:600} .base{color:#666;margin-top:4px} .refs{margin:0;padding-left:16px;color:#444}
"""

SCRIPT = """
(function () {
  var body = document.getElementById('gallery-body');
  if (!body) return;
  var rows = Array.prototype.slice.call(body.rows);
  var sort = document.getElementById('sort'), query = document.getElementById('query');
  var shown = document.getElementById('visible-count');
  function value(row, key) { return key === 'name' ? row.dataset.name : parseFloat(row.dataset[key]); }
  function apply() {
    var parts = sort.value.split('-'), key = parts[0], dir = parts[1] === 'desc' ? -1 : 1;
    rows.sort(function (a, b) {
      var x = value(a, key), y = value(b, key);
      if (x < y) return -dir;
      if (x > y) return dir;
      return a.dataset.name < b.dataset.name ? -1 : 1;
    });
    var needle = query.value.trim().toLowerCase(), count = 0;
    rows.forEach(function (row) {
      body.appendChild(row);
      row.hidden = needle !== '' && row.textContent.toLowerCase().indexOf(needle) < 0;
      if (!row.hidden) count++;
    });
    shown.textContent = count;
    document.body.setAttribute('data-sort', sort.value);
  }
  // report.html#sort=cider-desc&q=red opens sorted and filtered (links, and the browser test).
  var hash = new URLSearchParams(location.hash.slice(1));
  Array.prototype.forEach.call(sort.options, function (option) {
    if (option.value === hash.get('sort')) sort.value = option.value;
  });
  if (hash.get('q')) query.value = hash.get('q');
  sort.addEventListener('change', apply);
  query.addEventListener('input', apply);
  apply();
  document.body.setAttribute('data-ready', '1');
})();
"""


def _format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def _with_interval(value, metrics: dict, key: str) -> str:
    interval = (metrics.get("confidence") or {}).get(key)
    if interval is None or not isinstance(value, float):
        return _format_value(value)
    return f'{_format_value(value)} <span class="ci">[{interval["low"]:.4f}, {interval["high"]:.4f}]</span>'


def _change_cell(key: str, a, b, change: dict | None) -> str:
    """The change's cell: coloured when its paired interval excludes 0 (or, without intervals, when it is not 0)."""
    if not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)):
        return "<td>n/a</td>"
    delta, interval = b - a, (change or {}).get(key)
    better = delta < 0 if key == "fgd" else delta > 0
    shown = interval["significant"] if interval else delta != 0
    # Counts and diversity statistics have no better direction (fewer distinct captions can be right).
    css = "" if not shown or key.startswith("num_") or key in STAT_LABELS else (' class="up"' if better else ' class="down"')
    text = f"{delta:+d}" if isinstance(delta, int) else f"{delta:+.4f}"
    if interval:
        text += (f' <span class="ci">[{interval["low"]:+.4f}, {interval["high"]:+.4f}]</span>'
                 + (" *" if interval["significant"] else ""))
    return f"<td{css}>{text}</td>"


def render_metrics_table(heading: str, columns: list[tuple[str, dict]], change: dict | None = None) -> str:
    """A metric table with 95% intervals; with two columns a third shows the change (green up, red down when its
    paired interval excludes 0, `change` = {metric: interval}; FGD is better down)."""
    esc = html.escape
    head = "".join(f"<th>{esc(label)}</th>" for label, _ in columns)
    with_change = len(columns) == 2
    head += "<th>change</th>" if with_change else ""
    body = []
    for key in TABLE_KEYS + tuple(STAT_LABELS):
        values = [metrics.get(key) for _, metrics in columns]
        if all(v is None for v in values) and not (key == "fgd" and any(key in m for _, m in columns)):
            continue
        cells = "".join(f"<td>{_with_interval(v, m, key)}</td>" for v, (_, m) in zip(values, columns))
        if with_change:
            cells += _change_cell(key, *values, change)
        body.append(f"<tr><td>{esc(METRIC_LABELS.get(key, key))}</td>{cells}</tr>")
    notes = "".join(f'<div class="note">{esc(label)}: {esc(m[k])}</div>'
                    for k in ("meteor_note", "fgd_note") for label, m in columns if m.get(k))
    if any(m.get("confidence") for _, m in columns):
        notes += ('<div class="note">[low, high]: 95% bootstrap interval over images (1000 resamples)'
                  + ("; * the paired interval of the change excludes 0" if change else "") + "</div>")
    return (f'<div><h3>{esc(heading)}</h3><table class="metrics"><thead><tr><th>metric</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>{notes}</div>')


def render_row(row: GalleryRow, roots: list[Path], clip_column: bool = False) -> str:
    esc = html.escape
    uri, why = thumbnail_data_uri(find_image(row.name, roots))
    image = (f'<img class="thumb" src="{uri}" alt="{esc(row.name)}" loading="lazy">' if uri
             else f'<div class="missing" title="{esc(why)}">no image</div>')
    base = ""
    if row.base is not None:
        scores = [f"{label} {value:.3f}" for label, value in (("CIDEr-D", row.base_cider), ("CLIP-S", row.base_clip_score))
                  if value is not None]
        score = f" ({', '.join(scores)})" if scores else ""
        base = f'<div class="base">base model: {esc(row.base)}{score}</div>'
    gain = row.cider - row.base_cider if row.base_cider is not None and row.cider is not None else 0.0
    refs = "".join(f"<li>{esc(ref)}</li>" for ref in row.references)
    numbers = {"cider": row.cider, "bleu4": row.bleu_4, **({"meteor": row.meteor} if row.meteor is not None else {}),
               **({"clip": row.clip_score} if clip_column else {})}
    data = "".join(f' data-{key}="{value:.6g}"' for key, value in numbers.items() if value is not None)
    cells = "".join(f'<td class="num">{"n/a" if value is None else f"{value:.3f}"}</td>' for value in numbers.values())
    return (f'<tr class="row" data-name="{esc(row.name)}"{data} '
            f'data-gain="{gain:.6g}"><td>{image}</td><td><div class="name">{esc(row.name)}</div>'
            f'<div class="pred">{esc(row.prediction)}</div>{base}</td><td><ul class="refs">{refs}</ul></td>'
            f'{cells}</tr>')


def render_gallery(data: ReportData, roots: list[Path]) -> str:
    has_base = any(row.base_cider is not None for row in data.rows)
    options = [("cider-asc", "CIDEr-D, worst first"), ("cider-desc", "CIDEr-D, best first"),
               ("bleu4-asc", "BLEU-4, worst first"), ("bleu4-desc", "BLEU-4, best first"), ("name-asc", "file name")]
    if has_base:
        options.insert(2, ("gain-asc", "CIDEr-D change vs base, most worse first"))
    has_meteor = bool(data.rows) and all(row.meteor is not None for row in data.rows)
    if has_meteor:
        options[-1:-1] = [("meteor-asc", "METEOR, worst first"), ("meteor-desc", "METEOR, best first")]
    clip_column = any(row.clip_score is not None for row in data.rows)
    if clip_column:
        options[-1:-1] = [("clip-asc", "CLIP-S, worst first"), ("clip-desc", "CLIP-S, best first")]
    if all(row.cider is None for row in data.rows):  # no references: CIDEr-D and BLEU-4 sorts mean nothing
        options = [o for o in options if not o[0].startswith(("cider", "bleu4", "gain"))]
    select = "".join(f'<option value="{value}">{label}</option>' for value, label in options)
    rows = "".join(render_row(row if has_meteor else dataclasses.replace(row, meteor=None), roots, clip_column)
                   for row in data.rows)
    shown, ranked_by = len(data.rows), "CIDEr-D" if any(row.cider is not None for row in data.rows) else "CLIP-S"
    return (f'<h2>Gallery</h2><p class="sub" id="gallery-count">Showing {shown} of {data.num_scored} scored images'
            + (f" (the {GALLERY_WORST} worst and {GALLERY_BEST} best by {ranked_by}, and {GALLERY_RANDOM} at random)"
               if shown < data.num_scored else "")
            + '.</p><p class="note">Per-image CIDEr-D uses the document frequencies of the whole evaluated set (the '
              'per-image values average to the corpus CIDEr-D). Per-image BLEU-4 is pycocoevalcap\'s sentence-level '
              'BLEU; the corpus BLEU-4 above pools n-gram counts over all images and is not their mean.</p>'
            f'<div class="controls"><label>Sort <select id="sort">{select}</select></label> '
            f'<label>Search <input id="query" type="search" placeholder="caption, reference or file name"></label> '
            f'<span class="note"><span id="visible-count">{shown}</span> rows shown</span></div>'
            f'<table class="gallery"><thead><tr><th>image</th><th>caption</th><th>references</th><th>CIDEr-D</th>'
            f'<th>BLEU-4</th>{"<th>METEOR</th>" if has_meteor else ""}{"<th>CLIP-S</th>" if clip_column else ""}'
            f'</tr></thead><tbody id="gallery-body">{rows}</tbody></table>')


def render_report(data: ReportData, roots: list[Path]) -> str:
    esc = html.escape
    tables = "".join(render_metrics_table(heading, columns, change[0] if change else None)
                     for heading, columns, *change in data.tables)
    plots = ("<h2>Training</h2>" + '<div class="plots">' + "".join(data.plots) + "</div>"
             '<p class="note">Caption metrics during training: before training at step 0, after training (the model '
             "saved as final_model, i.e. the best checkpoint) at the last step, and at each evaluation in between "
             "when training ran with --metric_for_best_model set to a caption metric.</p>") if data.plots else ""
    notes = "".join(f'<p class="{"warn" if note.startswith("Warning") else "note"}">{esc(note)}</p>' for note in data.notes)
    subtitle = "".join(f'<p class="sub">{esc(line)}</p>' for line in data.subtitle)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(data.title)}</title><style>{STYLE}</style></head>\n<body>"
            f'<h1>{esc(data.title)}</h1>{subtitle}<h2>Metrics</h2><div class="tables">{tables}</div>{notes}{plots}'
            f"{render_gallery(data, roots)}<script>{SCRIPT}</script></body></html>\n")


# ---------------------------------------------------------------------------
# Writers called by --eval and --train; a failure is a warning, never the end of the mode
# ---------------------------------------------------------------------------


def _write(path: Path, data: ReportData, roots: list[Path], start: float) -> Path | None:
    try:
        write_text_atomic(path, render_report(data, roots))
    except Exception as error:  # noqa: BLE001 - the report is an extra; the metrics are already written
        logger.warning("Could not write the HTML report %s: %s: %s", path, type(error).__name__, error)
        return None
    logger.info("Wrote %s (%d images shown, %.0f KB, %.1f s)", path, len(data.rows),
                path.stat().st_size / 1024, time.perf_counter() - start)
    return path


def _training_tables(training: dict, heading: str) -> list:
    if training.get("before") and training.get("after"):
        columns = [("before training", training["before"]), ("after training", training["after"])]
        return [(heading, columns, training.get("change"))] + _stats_table(f"{heading}: caption diversity", columns)
    return []


def _stats_table(heading: str, columns: list[tuple[str, dict]]) -> list:
    """The caption statistics of each column (its "caption_stats"), as one more metric table; [] when none has them."""
    stats = [(label, metrics.get("caption_stats") or {}) for label, metrics in columns]
    return [(heading, stats)] if any(s for _, s in stats) else []


def _warnings_and_notes(columns: list[tuple[str, dict]]) -> list[str]:
    """Collapse warnings first, then why a metric is missing, one line each, labelled by column."""
    lines = [f"Warning ({label}): {m['collapse_warning']}" for label, m in columns if m.get("collapse_warning")]
    return lines + [f"{label}: {m[key]}" for key in ("references_note", "clip_note", "base_model_note")
                    for label, m in columns if m.get(key)]


def protocol_line(*metric_dicts: dict) -> str:
    """The report's first line under the title: which tokenization every number here was computed with."""
    tokenizers = sorted({d.get("caption_tokenizer") for d in metric_dicts if d} - {None})
    if not tokenizers:
        return "Scoring protocol: simple (lowercase, ASCII punctuation to spaces; recorded before protocols were named)"
    text = "Scoring protocol: " + "; ".join(PROTOCOLS.get(t, t) for t in tokenizers)
    return text + (" (the tables differ in protocol: do not compare them)" if len(tokenizers) > 1 else "")


def build_eval_report(run_dir: Path, predictions: dict[str, str], references: dict[str, list[str]],
                      metrics: dict, info: dict, seed: int = 0, scores=None) -> ReportData:
    """The --eval page: its metrics, the run's base captions when they exist, the run's training records.

    scores: the evaluation's utils.evaluation.CaptionScores (per-image METEOR, the base model's metrics and the
    paired change intervals); without it the per-image and base scores are computed here, without METEOR.
    """
    run_dir = Path(run_dir)
    base_captions = {name: r["before"] for name, r in read_val_predictions(run_dir / VAL_PREDICTIONS_NAME).items()
                     if r["before"]}
    base = align_names(base_captions, references or {name: [] for name in predictions}) if base_captions else {}
    clip = (metrics.get("per_image") or {}).get("clip_score")
    tokenizer = metrics.get("caption_tokenizer", "simple")
    rows, per_image, base_metrics = build_gallery(predictions, references, base, seed, tokenizer,
                                                  scores.per_image if scores is not None else None, clip)
    if scores is not None and scores.baseline is not None:
        base_metrics = scores.baseline
    label = "this evaluation"
    if metrics.get("base_model"):  # CLIP-S and statistics of the base model's captions, scored by --eval
        base_metrics = {**(base_metrics or {}), **metrics["base_model"]}
        base_clip = (metrics["base_model"].get("per_image") or {}).get("clip_score") or {}
        for row in rows:
            row.base_clip_score = base_clip.get(row.name)
    columns = [("base model", {**base_metrics, "fgd": None}), (label, metrics)] if base_metrics else [(label, metrics)]
    training = read_json(run_dir / "metrics.json")
    change = metrics.get("change") or (scores.change if scores is not None else None)
    tables = [("Evaluated images", columns, change)] + _stats_table("Evaluated images: caption diversity", columns)
    tables += _training_tables(training, "Validation images during training")
    source = info.get("model") or info.get("predictions_file") or ""
    subtitle = [protocol_line(metrics, *(c for t in tables for _, c in t[1])),
                f"--eval of {source}" if source else "--eval",
                *(f"{k}: {info[k]}" for k in ("test_dir", "captions_file") if info.get(k)),
                f"written {datetime.now().isoformat(timespec='seconds')}"]
    notes = _warnings_and_notes(columns)
    if base and not base_metrics:
        notes.append("The base model's captions (from val_predictions.csv) cover only some of these images, "
                     "so they are shown without base-model metrics.")
    history = read_train_history(run_dir)
    return ReportData("Caption report", subtitle, tables, rows, len(per_image), build_plots(history, training) if
                      (history or training) else [], notes)


def write_eval_report(config, predictions: dict[str, str], references: dict[str, list[str]], metrics: dict,
                      info: dict, images=None, scores=None) -> Path | None:
    """OUTPUT_DIR/report.html for --eval; images are looked up under --test_dir, then beside the captions file
    and the predictions file (names such as "test/a.jpg" are relative to the captions file's folder)."""
    start, out = time.perf_counter(), Path(config.output_dir)
    roots = [Path(p) for p in (config.test_dir, config.captions_file and Path(config.captions_file).parent,
                               config.predictions_file and Path(config.predictions_file).parent) if p]
    roots = ([images] if images is not None and hasattr(images, "load") else []) + roots
    try:
        data = build_eval_report(out, predictions, references, metrics, info, config.seed, scores)
    except Exception as error:  # noqa: BLE001
        logger.warning("Could not build the HTML report: %s: %s", type(error).__name__, error)
        return None
    return _write(out / REPORT_NAME, data, roots, start)


def write_training_report(run_dir: Path, val_dir: Path, references: dict[str, list[str]], seed: int = 0,
                          per_image: dict[str, dict] | None = None) -> Path | None:
    """RUN/report.html at the end of --train, from the run's own records: metrics.json, val_predictions.csv and
    train_history.json (per_image: the after-training scores already computed, with METEOR)."""
    start, run_dir = time.perf_counter(), Path(run_dir)
    try:
        training = read_json(run_dir / "metrics.json")
        captions = read_val_predictions(run_dir / VAL_PREDICTIONS_NAME)
        after = {name: r["after"] for name, r in captions.items() if name in references}
        before = {name: r["before"] for name, r in captions.items() if name in references and r["before"]}
        tokenizer = (training.get("after") or {}).get("caption_tokenizer", "simple")
        rows, scores, _ = build_gallery(after, references, before, seed, tokenizer, per_image)
        subtitle = [protocol_line(training.get("before") or {}, training.get("after") or {}),
                    f"--train run {run_dir.name}: validation images of {val_dir}, captioned after training",
                    f"written {datetime.now().isoformat(timespec='seconds')}"]
        tables = (_training_tables(training, "Validation images")
                  or [("Validation images", [("after training", training.get("after") or {})])])
        notes = _warnings_and_notes([(f"{when} training", training.get(when) or {}) for when in ("before", "after")])
        data = ReportData("Caption report", subtitle, tables, rows, len(scores),
                          build_plots(read_train_history(run_dir), training), notes)
    except Exception as error:  # noqa: BLE001
        logger.warning("Could not build the HTML report: %s: %s", type(error).__name__, error)
        return None
    return _write(run_dir / REPORT_NAME, data, [val_dir if hasattr(val_dir, "load") else Path(val_dir)], start)
