"""Scores predicted captions against references: BLEU, ROUGE, CIDEr-D, FGD, and the metrics table."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from utils.dataset_utils import format_names, warn_names
from utils.errors import UserInputError
from utils.hub import check_hub_name
from utils.progress import progress
from utils.text import normalize_caption

logger = logging.getLogger(__name__)

DEFAULT_FGD_MODEL = "thenlper/gte-small"
# Order of rows in tables and of keys in the metrics dict.
METRIC_KEYS = (
    "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "rouge_1", "rouge_2", "fgd",
    "num_images", "num_references",
)
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


def _build_scoring_sets(
    predictions: dict[str, str], references: dict[str, list[str]]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Normalised prediction and references per image; images lacking either are left out."""
    hypotheses, refs, no_reference = {}, {}, []
    for name in sorted(set(predictions) & set(references)):
        kept = [r for r in (normalize_caption(c) for c in references[name]) if r]
        if not kept:
            no_reference.append(name)
            continue
        hypotheses[name] = normalize_caption(predictions[name])
        refs[name] = kept
    _warn_names("Images whose reference captions are all empty after normalisation, not scored", no_reference)
    if not hypotheses:
        raise UserInputError(
            "No image has both a prediction and a non-empty reference caption in --captions_file, "
            "so there is nothing to score. Check that --captions_file has a caption for the "
            "images in --predictions_file."
        )
    return hypotheses, refs


# ---------------------------------------------------------------------------
# N-gram metrics
# ---------------------------------------------------------------------------


def _compute_coco_metrics(hypotheses: dict[str, str], references: dict[str, list[str]]) -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr-D from pycocoevalcap on already normalised text."""
    res = {name: [caption] for name, caption in hypotheses.items()}
    gts = {name: references[name] for name in hypotheses}
    # pycocoevalcap prints progress in places; stdout belongs to the CLI's own output.
    with contextlib.redirect_stdout(sys.stderr):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge_l, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    metrics = {f"bleu_{n}": float(bleu[n - 1]) for n in range(1, 5)}
    metrics.update(rouge_l=float(rouge_l), cider=float(cider))
    return metrics


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


def compute_caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr-D, ROUGE-1/2 and counts for images with a prediction and references.

    An empty prediction is scored as a caption with no words: pycocoevalcap handles "" without
    error (BLEU: length 0 and no n-grams, ROUGE-L and CIDEr-D: 0), so it is passed through as is.
    """
    hypotheses, refs = _build_scoring_sets(predictions, references)
    if len(hypotheses) < 2:
        logger.warning(
            "Only one image is scored: CIDEr-D takes its document frequencies from the evaluated "
            "set, so with a single image it is always 0."
        )
    metrics = _compute_coco_metrics(hypotheses, refs)
    metrics.update(_compute_rouge_n(hypotheses, refs))
    metrics["num_images"] = len(hypotheses)
    metrics["num_references"] = sum(len(r) for r in refs.values())
    return metrics


def compute_per_image_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, dict]:
    """CIDEr-D and BLEU-4 of each image, on the same normalised text and image set as compute_caption_metrics.

    CIDEr-D takes its document frequencies from the whole evaluated set, so the per-image values
    average to the corpus CIDEr-D. BLEU-4 is pycocoevalcap's sentence-level BLEU (its per-image
    list: clipped n-gram precisions with a tiny smoothing constant and the image's own brevity
    penalty); the corpus BLEU-4 pools counts over images and is not their mean.
    """
    hypotheses, refs = _build_scoring_sets(predictions, references)
    res = {name: [caption] for name, caption in hypotheses.items()}
    gts = {name: refs[name] for name in hypotheses}
    with contextlib.redirect_stdout(sys.stderr):
        _, bleu = Bleu(4).compute_score(gts, res, verbose=0)
        _, cider = Cider().compute_score(gts, res)
    # Both scorers walk gts in insertion order, so position i is the i-th name.
    return {name: {"cider": float(cider[i]), "bleu_4": float(bleu[3][i])} for i, name in enumerate(gts)}


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


def _describe_load_error(encoder_name: str, err: Exception) -> str:
    """First line of a loading error; for a missing folder, say so instead of transformers' repo-id complaint."""
    looks_like_path = encoder_name.startswith((".", "~")) or Path(encoder_name).is_absolute()
    if looks_like_path and not Path(encoder_name).expanduser().exists():
        return f"no such folder: {encoder_name}"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


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
        note = (f"FGD not computed: text encoder {encoder_name!r} could not be loaded ({_describe_load_error(encoder_name, err)}). "
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


def score_captions(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    fgd_model: str | None = DEFAULT_FGD_MODEL,
    device="cpu",
) -> dict:
    """All metrics for predictions against references, as one flat dict (see METRIC_KEYS)."""
    predictions, references = match_predictions(predictions, references)
    # Normalised once, so the n-gram metrics and FGD see the same images and the same text:
    # references' capitals and full stops would otherwise count as a difference in FGD.
    hypotheses, refs = _build_scoring_sets(predictions, references)
    metrics = compute_caption_metrics(hypotheses, refs)
    if fgd_model is None:
        fgd = {"fgd": None, "fgd_note": "FGD disabled (no text encoder given)."}
    else:
        all_refs = [caption for name in hypotheses for caption in refs[name]]
        fgd = compute_fgd(list(hypotheses.values()), all_refs, fgd_model, device)
    return {**metrics, **fgd}


# ---------------------------------------------------------------------------
# Reporting and files
# ---------------------------------------------------------------------------


def _format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.4f}"


def _format_change(before, after) -> str:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after)):
        return "n/a"
    if isinstance(before, int) and isinstance(after, int):
        return f"{after - before:+d}"
    return f"{after - before:+.4f}"


def _table_keys(*dicts) -> list[str]:
    present = [d for d in dicts if d]
    extra = sorted(
        {k for d in present for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        - set(METRIC_KEYS)
    )
    return [k for k in METRIC_KEYS if any(k in d for d in present)] + extra


def format_metrics_table(metrics: dict, other: dict | None = None) -> str:
    """Aligned text table of the metrics; with `other`, columns before (metrics) / after (other) / change."""
    keys = _table_keys(metrics, other)
    if other is None:
        rows = [("metric", "value")] + [(k, _format_value(metrics.get(k))) for k in keys]
    else:
        rows = [("metric", "before", "after", "change")] + [
            (k, _format_value(a), _format_value(b), _format_change(a, b))
            for k, a, b in ((k, metrics.get(k), other.get(k)) for k in keys)
        ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    labels = [("", metrics)] if other is None else [("before: ", metrics), ("after: ", other)]
    lines += [f"note: {label}{d['fgd_note']}" for label, d in labels if d.get("fgd_note") not in _WARNED_NOTES | {None}]
    return "\n".join(lines)


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
