"""Scores predicted captions against references: BLEU, METEOR, ROUGE, CIDEr-D, FGD, intervals, and the metrics table."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from utils.confidence import RESAMPLES, CorpusStats, bootstrap_intervals, paired_change_intervals
from utils.dataset_utils import format_names, warn_names
from utils.errors import UserInputError
from utils.hub import check_hub_name, describe_load_error
from utils.progress import progress
from utils.java_scorers import (
    INSTALL_JAVA, JavaError, check_java, compute_meteor, meteor_from_stats, meteor_summable, ptb_tokenize,
    resolve_caption_tokenizer,
)
from utils.text import normalize_caption

logger = logging.getLogger(__name__)

DEFAULT_FGD_MODEL = "thenlper/gte-small"
# Order of rows in tables and of keys in the metrics dict.
METRIC_KEYS = (
    "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider", "spice", "rouge_1", "rouge_2", "fgd",
    "num_images", "num_references",
)
SPICE_NOTE = ("SPICE not computed: it needs the Stanford CoreNLP 3.6.0 models, which are not installed "
              "(pycocoevalcap would download them; nothing is downloaded here).")
# What each --caption_tokenizer means, for the table and the report.
PROTOCOLS = {
    "ptb": "ptb: Stanford PTBTokenizer, lowercased, punctuation removed (the COCO caption evaluation protocol)",
    "simple": "simple: lowercase, ASCII punctuation to spaces (not comparable with published COCO tables)",
}
# Imaginary parts of sqrtm(S1 S2) below this are rounding noise (pytorch-fid uses the same bound).
MAX_IMAGINARY = 1e-3



# ---------------------------------------------------------------------------
# Matching and normalising captions
# ---------------------------------------------------------------------------


def _format_names(names) -> str:
    return format_names(sorted(names))


def _warn_names(message: str, names) -> None:
    warn_names(message, sorted(names), logger)


def match_predictions(
    predictions: dict[str, str], references: dict[str, list[str]]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Keep the images that have both a prediction and references, warning about the rest."""
    matched = sorted(set(predictions) & set(references))
    if not matched:
        raise UserInputError(
            f"No image name in --predictions_file ({len(predictions)} images, e.g. "
            f"{_format_names(sorted(predictions)[:3]) or 'none'}) is also in --captions_file "
            f"({len(references)} images, e.g. {_format_names(sorted(references)[:3]) or 'none'}), "
            "so there is nothing to score. Check that both files name the images the same way "
            "(same folder prefix and file extension) and that they belong to the same image set."
        )
    _warn_names("Predictions without reference captions, not scored", set(predictions) - set(references))
    _warn_names("Images with reference captions but no prediction, not scored", set(references) - set(predictions))
    _warn_names(
        "Empty predictions, scored as captions with no words",
        [name for name in matched if not normalize_caption(predictions[name])],
    )
    return {name: predictions[name] for name in matched}, {name: list(references[name]) for name in matched}


def tokenize_captions(texts: list[str], caption_tokenizer: str, java: str | None = "java") -> list[str]:
    """The text every metric sees: "ptb" (the COCO protocol, one Java process for all texts) or "simple"."""
    if caption_tokenizer == "simple":
        return [normalize_caption(text) for text in texts]
    try:
        return ptb_tokenize(texts, java)
    except JavaError as error:
        raise UserInputError(
            f"--caption_tokenizer ptb could not tokenize the captions: {error}. Rerun with --caption_tokenizer simple "
            "(numbers not comparable with published COCO tables), or fix the Java installation "
            f"(`{INSTALL_JAVA}`)."
        ) from None


@dataclass
class ScoringSets:
    """Tokenized predictions (and a baseline's, on the same images) and references of the images scored."""

    hypotheses: dict[str, str]
    references: dict[str, list[str]]
    baseline: dict[str, str] | None = None


def _build_scoring_sets(
    predictions: dict[str, str], references: dict[str, list[str]], caption_tokenizer: str = "simple",
    java: str | None = "java", baseline: dict[str, str] | None = None,
) -> ScoringSets:
    """Tokenized prediction and references per image; images lacking either are left out."""
    names = sorted(set(predictions) & set(references))
    texts = [predictions[n] for n in names] + [c for n in names for c in references[n]]
    texts += [baseline.get(n, "") for n in names] if baseline is not None else []
    tokens = iter(tokenize_captions(texts, caption_tokenizer, java))
    hypotheses = {name: next(tokens) for name in names}
    refs = {name: [r for r in (next(tokens) for _ in references[name]) if r] for name in names}
    base = {name: next(tokens) for name in names} if baseline is not None else None
    no_reference = [name for name in names if not refs[name]]
    _warn_names(f"Images whose reference captions are all empty after {caption_tokenizer} tokenization, not scored",
                no_reference)
    for name in no_reference:
        del hypotheses[name], refs[name]
        if base is not None:
            del base[name]
    if not hypotheses:
        raise UserInputError(
            "No image has both a prediction and a non-empty reference caption in --captions_file, "
            "so there is nothing to score. Check that --captions_file has a caption for the "
            "images in --predictions_file."
        )
    return ScoringSets(hypotheses, refs, base)


# ---------------------------------------------------------------------------
# N-gram metrics
# ---------------------------------------------------------------------------


def _compute_coco_metrics(hypotheses: dict[str, str], references: dict[str, list[str]]) -> tuple[dict, dict]:
    """BLEU-1..4, ROUGE-L and CIDEr-D from pycocoevalcap on already tokenized text, and per-image scores."""
    res = {name: [caption] for name, caption in hypotheses.items()}
    gts = {name: references[name] for name in hypotheses}
    # pycocoevalcap prints progress in places; stdout belongs to the CLI's own output.
    with contextlib.redirect_stdout(sys.stderr):
        bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
        rouge_l, rouge_images = Rouge().compute_score(gts, res)
        cider, cider_images = Cider().compute_score(gts, res)
    metrics = {f"bleu_{n}": float(bleu[n - 1]) for n in range(1, 5)}
    metrics.update(rouge_l=float(rouge_l), cider=float(cider))
    # Every scorer walks gts in insertion order, so position i is the i-th name.
    per_image = {name: {"cider": float(cider_images[i]), "bleu_4": float(bleu_images[3][i]),
                        "rouge_l": float(rouge_images[i])} for i, name in enumerate(gts)}
    return metrics, per_image


def _compute_rouge_n(hypotheses: dict[str, str], references: dict[str, list[str]]) -> dict:
    """ROUGE-1/2 F-measure from rouge_score, best reference per image, averaged over images."""
    from rouge_score import rouge_scorer  # imported here: it brings nltk (~60 MB), and training may never score

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"])
    totals = {"rouge1": 0.0, "rouge2": 0.0}
    for name, caption in hypotheses.items():
        best = scorer.score_multi(references[name], caption)
        for key in totals:
            totals[key] += best[key].fmeasure
    return {"rouge_1": totals["rouge1"] / len(hypotheses), "rouge_2": totals["rouge2"] / len(hypotheses)}


def _ngram_metrics(hypotheses: dict[str, str], refs: dict[str, list[str]]) -> tuple[dict, dict]:
    if len(hypotheses) < 2:
        logger.warning(
            "Only one image is scored: CIDEr-D takes its document frequencies from the evaluated "
            "set, so with a single image it is always 0."
        )
    metrics, per_image = _compute_coco_metrics(hypotheses, refs)
    metrics.update(_compute_rouge_n(hypotheses, refs))
    metrics["num_images"] = len(hypotheses)
    metrics["num_references"] = sum(len(r) for r in refs.values())
    return metrics, per_image


def compute_caption_metrics(predictions: dict[str, str], references: dict[str, list[str]],
                            caption_tokenizer: str = "auto", java: str | None = "java") -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr-D, ROUGE-1/2 and counts for images with a prediction and references (no Java
    scorer but the tokenizer: METEOR, FGD and intervals come with score_captions).

    An empty prediction is scored as a caption with no words: pycocoevalcap handles "" without
    error (BLEU: length 0 and no n-grams, ROUGE-L and CIDEr-D: 0), so it is passed through as is.
    """
    tokenizer = resolve_caption_tokenizer(caption_tokenizer, java)
    sets = _build_scoring_sets(predictions, references, tokenizer, java)
    return {**_ngram_metrics(sets.hypotheses, sets.references)[0], "caption_tokenizer": tokenizer}


def compute_per_image_scores(predictions: dict[str, str], references: dict[str, list[str]],
                             caption_tokenizer: str = "auto", java: str | None = "java") -> dict[str, dict]:
    """CIDEr-D, BLEU-4 and ROUGE-L of each image, on the same tokenized text and image set as compute_caption_metrics.

    CIDEr-D takes its document frequencies from the whole evaluated set, so the per-image values
    average to the corpus CIDEr-D. BLEU-4 is pycocoevalcap's sentence-level BLEU (its per-image
    list: clipped n-gram precisions with a tiny smoothing constant and the image's own brevity
    penalty); the corpus BLEU-4 pools counts over images and is not their mean.
    """
    sets = _build_scoring_sets(predictions, references, resolve_caption_tokenizer(caption_tokenizer, java), java)
    return _compute_coco_metrics(sets.hypotheses, sets.references)[1]


# ---------------------------------------------------------------------------
# Fréchet GTE Distance
# ---------------------------------------------------------------------------


def _is_singular(sigma: np.ndarray) -> bool:
    return np.linalg.matrix_rank(sigma, hermitian=True) < sigma.shape[0]


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> tuple[np.ndarray, float]:
    """sqrtm(sigma1 @ sigma2) and the largest imaginary part it had (nan when not finite)."""
    from scipy import linalg  # imported here: only FGD needs it
    # Singular or ill-conditioned products make scipy warn; the caller checks the result instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        return covmean, math.nan
    imaginary = float(np.abs(covmean.imag).max()) if np.iscomplexobj(covmean) else 0.0
    return covmean.real, imaginary


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> tuple[float, str | None]:
    """Fréchet distance between two Gaussians, and a note when the covariances were regularised.

    Like pytorch-fid's calculate_frechet_distance, eps * I is added when sqrtm fails; unlike it,
    the offset is also added when a covariance is singular (fewer samples than dimensions), and
    to both covariances everywhere, so identical inputs still give 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Shapes do not match: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    note = None
    if _is_singular(sigma1) or _is_singular(sigma2):
        note = "a covariance matrix is singular"
    else:
        covmean, imaginary = _sqrtm_product(sigma1, sigma2)
        if not imaginary <= MAX_IMAGINARY:  # also true for nan (non-finite sqrtm)
            note = "sqrtm(S1 S2) was not finite or had a large imaginary part"
    if note is not None:
        offset = eps * np.eye(sigma1.shape[0])
        sigma1, sigma2 = sigma1 + offset, sigma2 + offset
        covmean, imaginary = _sqrtm_product(sigma1, sigma2)
        note = f"{note}; added {eps:g} * I to both covariances"
        if not imaginary <= MAX_IMAGINARY:
            note += f"; sqrtm still had imaginary parts up to {imaginary:.3g}, real part used"
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    # Rounding makes the distance of (nearly) identical Gaussians come out slightly below 0.
    return max(distance, 0.0), note


_ENCODERS: dict[tuple[str, str], tuple | Exception] = {}
_WARNED_NOTES: set[str] = set()  # notes already logged as a warning, which the tables do not repeat


def load_text_encoder(name_or_path: str, device="cpu"):
    """(model, tokenizer) of a sentence encoder from a hub id or a local folder, in eval mode.

    Kept per process, failures too: training scores before and after, and an offline hub lookup
    spends most of a minute on retries.
    """
    key = (str(name_or_path), str(device))
    if key not in _ENCODERS:
        # Imported here: transformers is slow to import and only FGD needs it.
        from transformers import AutoModel, AutoTokenizer

        try:
            check_hub_name(str(name_or_path), "--fgd_model", local_hint="a local encoder folder")
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            _ENCODERS[key] = (AutoModel.from_pretrained(name_or_path).to(device).eval(), tokenizer)
        except Exception as error:  # noqa: BLE001  (compute_fgd turns it into a note)
            _ENCODERS[key] = error
    if isinstance(_ENCODERS[key], Exception):
        raise _ENCODERS[key]
    return _ENCODERS[key]


def embed_captions(captions: list[str], encoder, tokenizer, device="cpu", batch_size=64) -> np.ndarray:
    """L2-normalised mean-pooled embeddings, one row per caption (the GTE recipe)."""
    batches = [captions[i : i + batch_size] for i in range(0, len(captions), batch_size)]
    rows = [np.zeros((0, encoder.config.hidden_size), np.float32)]
    for batch in progress(batches, desc="Embedding captions for FGD", unit="batches", logger=logger, leave=False,
                          disable=len(batches) < 2):
        inputs = tokenizer(batch, padding=True, truncation=True, max_length=512, return_tensors="pt").to(device)
        with torch.no_grad():
            hidden = encoder(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        rows.append(torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy())
    return np.concatenate(rows)


def _too_few_captions(n_pred: int, n_ref: int) -> dict:
    # A covariance needs at least two samples.
    note = f"FGD not computed: it needs at least 2 captions per set ({n_pred} predictions, {n_ref} references)."
    return {"fgd": None, "fgd_note": note}


def fgd_from_embeddings(prediction_embeddings: np.ndarray, reference_embeddings: np.ndarray) -> dict:
    """FGD between two embedding sets (rows are captions), with a note when it is less reliable."""
    n_pred, n_ref = len(prediction_embeddings), len(reference_embeddings)
    if min(n_pred, n_ref) < 2:
        return _too_few_captions(n_pred, n_ref)
    pred, ref = np.asarray(prediction_embeddings, np.float64), np.asarray(reference_embeddings, np.float64)
    distance, note = frechet_distance(
        pred.mean(axis=0), np.cov(pred, rowvar=False), ref.mean(axis=0), np.cov(ref, rowvar=False)
    )
    if note is not None:
        note = (
            f"FGD regularised: {note} ({n_pred} predictions and {n_ref} references, embedding size "
            f"{pred.shape[1]}). With few captions FGD is biased; compare it only between runs on the same images."
        )
    return {"fgd": distance, "fgd_note": note}


def compute_fgd(
    predictions: list[str], references: list[str], encoder_name: str = DEFAULT_FGD_MODEL, device: str = "cpu"
) -> dict:
    """Fréchet GTE Distance between prediction and reference captions; never raises (fgd None + note)."""
    if min(len(predictions), len(references)) < 2:
        return _too_few_captions(len(predictions), len(references))
    try:
        encoder, tokenizer = load_text_encoder(encoder_name, device)
    # FGD is an extra: whatever stops the encoder loading must not cost the user the other metrics.
    except Exception as err:  # noqa: BLE001
        note = (f"FGD not computed: text encoder {encoder_name!r} could not be loaded ({describe_load_error(encoder_name, err)}). "
                "Give a local folder holding the encoder, or run with access to the Hugging Face hub. "
                "The other metrics are still valid.")
        if note not in _WARNED_NOTES:  # training scores before and after: one warning, not one per table
            _WARNED_NOTES.add(note)
            logger.warning("%s", note)
        return {"fgd": None, "fgd_note": note}
    return fgd_from_embeddings(
        embed_captions(predictions, encoder, tokenizer, device),
        embed_captions(references, encoder, tokenizer, device),
    )


def _meteor(sets: ScoringSets, java: str | None, enabled: bool) -> tuple[list[dict] | None, str | None]:
    """METEOR of the predictions (and the baseline) in one Java process: per set {score, segments, stats}, or a note."""
    if not enabled:
        return None, "METEOR not computed: disabled for this scoring."
    problem = check_java(java)
    if problem is not None:
        return None, (f"METEOR not computed: {problem}. Install Java (`{INSTALL_JAVA}`) or point --java at one; "
                      "the other metrics are still valid.")
    names = list(sets.hypotheses)
    systems = [sets.hypotheses] + ([sets.baseline] if sets.baseline is not None else [])
    try:
        result = compute_meteor([s[n] for s in systems for n in names],
                                [sets.references[n] for _ in systems for n in names], java)
    except JavaError as error:
        logger.warning("METEOR skipped: %s", error)
        return None, f"METEOR not computed: {error}. The other metrics are still valid."
    parts = []
    for k in range(len(systems)):
        part = slice(k * len(names), (k + 1) * len(names))
        stats, segments = result.stats[part], result.segment_scores[part]
        score = result.score if len(systems) == 1 else float(meteor_from_stats(meteor_summable(stats).sum(axis=0)))
        parts.append({"score": score, "segments": dict(zip(names, segments)), "stats": stats})
    return parts, None


def _score_ngrams(hypotheses: dict[str, str], refs: dict[str, list[str]],
                  extra: dict[str, dict[str, float]] | None) -> tuple[dict, dict, CorpusStats]:
    """The metrics dict, per-image scores and bootstrap statistics of one prediction set, METEOR aside."""
    metrics, per_image = _ngram_metrics(hypotheses, refs)
    metrics.update(spice=None, spice_note=SPICE_NOTE)
    names = list(hypotheses)
    means = {"rouge_l": [per_image[n]["rouge_l"] for n in names]}
    means.update({key: [values[n] for n in names] for key, values in (extra or {}).items() if set(names) <= set(values)})
    return metrics, per_image, CorpusStats.build(list(hypotheses.values()), [refs[n] for n in names], means)


def _add_meteor(scored: tuple[dict, dict, CorpusStats], meteor: dict | None, note: str | None) -> None:
    metrics, per_image, stats = scored
    metrics.update(meteor=meteor["score"] if meteor else None, meteor_note=note)
    if meteor:
        for name, score in meteor["segments"].items():
            per_image[name]["meteor"] = score
        stats.meteor = meteor_summable(meteor["stats"])


def _fgd(sets: ScoringSets, fgd_model: str | None, device) -> dict:
    if fgd_model is None:
        return {"fgd": None, "fgd_note": "FGD disabled (no text encoder given)."}
    all_refs = [caption for name in sets.hypotheses for caption in sets.references[name]]
    return compute_fgd(list(sets.hypotheses.values()), all_refs, fgd_model, device)


@dataclass
class CaptionScores:
    """What score_captions computes: the flat metrics dict, per-image scores, and with a baseline its metrics on
    the same images and the paired intervals of the change (this set minus the baseline)."""

    metrics: dict
    per_image: dict[str, dict[str, float]]
    baseline: dict | None = None
    baseline_per_image: dict[str, dict[str, float]] | None = None
    change: dict[str, dict] | None = None


def evaluate_captions(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    fgd_model: str | None = DEFAULT_FGD_MODEL,
    device="cpu",
    *,
    caption_tokenizer: str = "auto",
    java: str | None = "java",
    meteor: bool = True,
    baseline: dict[str, str] | None = None,
    extra_per_image: dict[str, dict[str, float]] | None = None,
    baseline_extra_per_image: dict[str, dict[str, float]] | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> CaptionScores:
    """Every metric of predictions against references (see METRIC_KEYS), with 95% bootstrap intervals in
    metrics["confidence"] (resamples=0: none); with `baseline` (captions of the same images by another model) also
    its metrics and the paired intervals of the change. extra_per_image: per-image mean-type metrics computed
    elsewhere ({metric: {image: value}}, e.g. CLIP-S), which get intervals too."""
    tokenizer = resolve_caption_tokenizer(caption_tokenizer, java)
    predictions, references = match_predictions(predictions, references)
    if baseline is not None and not set(predictions) <= set(baseline):
        logger.warning("The baseline captions miss %d of the scored images; no paired comparison.",
                       len(set(predictions) - set(baseline)))
        baseline = None
    # Tokenized once, so the n-gram metrics, METEOR and FGD see the same images and the same text.
    sets = _build_scoring_sets(predictions, references, tokenizer, java, baseline)
    systems = [(sets.hypotheses, extra_per_image)]
    systems += [(sets.baseline, baseline_extra_per_image)] if sets.baseline is not None else []
    with ThreadPoolExecutor(max_workers=1) as pool:
        # METEOR (in Java; on its first use in a job also its 10-30 s start) runs while Python computes the rest.
        pending = pool.submit(_meteor, sets, java, meteor)
        scored = [_score_ngrams(hypotheses, sets.references, extra) for hypotheses, extra in systems]
        fgd = _fgd(sets, fgd_model, device)
        meteor_parts, meteor_note = pending.result()
    for k, part in enumerate(scored):
        _add_meteor(part, meteor_parts[k] if meteor_parts else None, meteor_note)
        part[0]["caption_tokenizer"] = tokenizer
    (metrics, per_image, stats), base = scored[0], scored[1] if len(scored) > 1 else None
    metrics.update(fgd)
    if resamples:
        metrics["confidence"] = bootstrap_intervals(stats, resamples, seed)
    if base is None:
        return CaptionScores(metrics, per_image)
    base[0].update(fgd=None, fgd_note="FGD not computed for the baseline.")
    change = None
    if resamples:
        base[0]["confidence"] = bootstrap_intervals(base[2], resamples, seed)
        change = paired_change_intervals(base[2], stats, resamples, seed)
    return CaptionScores(metrics, per_image, base[0], base[1], change)


def score_captions(predictions: dict[str, str], references: dict[str, list[str]],
                   fgd_model: str | None = DEFAULT_FGD_MODEL, device="cpu", **options) -> dict:
    """All metrics for predictions against references, as one flat dict (see METRIC_KEYS and evaluate_captions)."""
    return evaluate_captions(predictions, references, fgd_model, device, **options).metrics


# ---------------------------------------------------------------------------
# Reporting and files
# ---------------------------------------------------------------------------


def _format_value(value, interval: dict | None = None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    text = f"{value:.4f}"
    return f"{text} [{interval['low']:.4f}, {interval['high']:.4f}]" if interval else text


def _format_change(before, after, interval: dict | None = None) -> str:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after)):
        return "n/a"
    if isinstance(before, int) and isinstance(after, int):
        return f"{after - before:+d}"
    if interval:
        mark = " *" if interval.get("significant") else "  "
        return f"{after - before:+.4f} [{interval['low']:+.4f}, {interval['high']:+.4f}]{mark}"
    return f"{after - before:+.4f}"


def _table_keys(*dicts) -> list[str]:
    present = [d for d in dicts if d]
    extra = sorted(
        {k for d in present for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        - set(METRIC_KEYS)
    )
    return [k for k in METRIC_KEYS if any(k in d for d in present)] + extra


def _notes(labels: list[tuple[str, dict]], change: dict | None) -> list[str]:
    """The lines under the table: protocol, what an interval is, and why a metric is missing."""
    tokenizers = {d.get("caption_tokenizer") for _, d in labels} - {None}
    lines = [f"protocol: {PROTOCOLS.get(t, t)}" for t in sorted(tokenizers)]
    if len(tokenizers) > 1:
        lines.append("warning: the columns were tokenized differently; their numbers are not comparable")
    sample = next((d["confidence"] for _, d in labels if d.get("confidence")), None) or next(iter((change or {}).values()), None)
    if sample:
        first = next(iter(sample.values())) if "level" not in sample else sample
        lines.append(f"[low, high]: {first['level']:.0%} bootstrap interval over images ({first['resamples']} resamples)"
                     + ("; * the paired interval of the change excludes 0" if change else ""))
    for key in ("meteor_note", "spice_note", "fgd_note"):
        lines += [f"note: {label}{d[key]}" for label, d in labels if d.get(key) and d[key] not in _WARNED_NOTES
                  and not (key == "spice_note" and label.startswith("after"))]  # the same SPICE note once
    return lines


def format_metrics_table(metrics: dict, other: dict | None = None, change: dict | None = None) -> str:
    """Aligned text table of the metrics with their intervals; with `other`, columns before (metrics) / after (other)
    / change, the change with its paired interval when `change` ({metric: interval}) is given."""
    keys = _table_keys(metrics, other)

    def ci(d, k):
        return (d.get("confidence") or {}).get(k)

    if other is None:
        rows = [("metric", "value")] + [(k, _format_value(metrics.get(k), ci(metrics, k))) for k in keys]
    else:
        rows = [("metric", "before", "after", "change")] + [
            (k, _format_value(a, ci(metrics, k)), _format_value(b, ci(other, k)), _format_change(a, b, (change or {}).get(k)))
            for k, a, b in ((k, metrics.get(k), other.get(k)) for k in keys)
        ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    labels = [("", metrics)] if other is None else [("before: ", metrics), ("after: ", other)]
    return "\n".join(lines + _notes(labels, change))


def align_names(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, str]:
    """Key predictions as the references are keyed.

    Captions of a folder are named relative to it ("a.jpg") while one captions file for train/ and
    test/ names them from its own folder ("test/a.jpg"); a unique suffix match pairs the two.
    """
    by_suffix: dict[str, list[str]] = {}
    for ref_name in references:
        parts = ref_name.split("/")
        for i in range(1, len(parts)):
            by_suffix.setdefault("/".join(parts[i:]), []).append(ref_name)
    aligned = {}
    for name, caption in predictions.items():
        candidates = by_suffix.get(name, [])
        key = name if name in references or len(candidates) != 1 else candidates[0]
        aligned.setdefault(key, caption)
    return aligned
