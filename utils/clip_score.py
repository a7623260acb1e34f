"""CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021): load the CLIP model once, embed images and captions, score.

Follows the reference code (github.com/jmhessel/clipscore, clipscore.py): every caption and reference gets the
prefix "A photo depicts ", image and text embeddings are L2-normalised, CLIP-S = 2.5 * max(cos(image, caption), 0)
per image; RefCLIP-S per image = harmonic mean of CLIP-S and the largest cosine between the caption and any of
its references; both are averaged over images. The model owns its life cycle here like the FGD encoder in
utils/evaluation.py: a local folder or a cached hub copy loads offline, an unreachable uncached hub id fails in
seconds, and a failure becomes a note (`clip_note`) while every other metric is still reported.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from utils.dataset_utils import ImageItems, as_image_source
from utils.hub import check_hub_name, describe_load_error
from utils.progress import progress
from utils.workers import data_loader

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"  # the paper's ViT-B/32
PREFIX = "A photo depicts "  # the reference code's prompt, on candidates and references alike
WEIGHT = 2.5  # w in CLIP-S = w * max(cos, 0), the paper's rescaling of ViT-B/32's small image-text cosines
TEXT_BATCH = 256  # the reference code's caption batch
IMAGE_BATCH = 64  # and its image batch (only used when scoring without captioning, see embed_image_source)

_MODELS: dict[tuple[str, str], "ClipEmbedder | Exception"] = {}


class ClipEmbedder:
    """A CLIP model and its processor in eval mode: L2-normalised image and caption embeddings as numpy rows."""

    def __init__(self, model, processor, device: str = "cpu"):
        self.model, self.processor, self.device = model, processor, device
        self.max_tokens = model.config.text_config.max_position_embeddings  # 77: the reference code truncates there
        self.seconds = 0.0  # time spent embedding, for images/s

    @torch.no_grad()
    def embed_images(self, images: list) -> np.ndarray:
        """One normalised row per PIL image (CLIP's own resize, centre crop and normalisation)."""
        if not images:
            return np.zeros((0, self.model.config.projection_dim), np.float32)
        start = time.perf_counter()
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values.to(self.device)
        features = self.model.get_image_features(pixel_values=pixels)
        # float32 rows: under torchrun they are gathered from every rank (20,000 ViT-B/32 images: 41 MB).
        rows = _normalise(_projected(features)).astype(np.float32)
        self.seconds += time.perf_counter() - start
        return rows

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = TEXT_BATCH) -> np.ndarray:
        """One normalised row per caption, each read as PREFIX + caption (cut at CLIP's 77 tokens)."""
        rows = [np.zeros((0, self.model.config.projection_dim), np.float32)]
        batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
        for batch in progress(batches, total=len(batches), desc="CLIP text", unit="batches", logger=logger, leave=False,
                              disable=len(batches) < 2):
            inputs = self.processor.tokenizer(
                [PREFIX + " ".join(text.split()) for text in batch], padding=True, truncation=True,
                max_length=self.max_tokens, return_tensors="pt",
            ).to(self.device)
            features = self.model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
            rows.append(_normalise(_projected(features)))
        return np.concatenate(rows)


def _projected(features) -> torch.Tensor:
    # transformers 5 returns BaseModelOutputWithPooling whose pooler_output is the projected embedding;
    # older versions returned the tensor itself.
    return getattr(features, "pooler_output", features)


def _normalise(features: torch.Tensor) -> np.ndarray:
    rows = features.float().cpu().numpy().astype(np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True).clip(min=1e-12)


def load_clip(name_or_path: str, device: str = "cpu") -> ClipEmbedder:
    """The CLIP model of --clip_model (hub id or local folder), loaded once per process; a failure is kept too,
    so it costs seconds once, not once per evaluation. Raises what stopped the load."""
    key = (str(name_or_path), str(device))
    if key not in _MODELS:
        from transformers import AutoModel, AutoProcessor  # imported here: only CLIP-S needs them

        try:
            check_hub_name(str(name_or_path), "--clip_model", local_hint="a local CLIP folder")
            processor = AutoProcessor.from_pretrained(name_or_path)
            model = AutoModel.from_pretrained(name_or_path).to(device).eval()
            if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
                raise ValueError(f"{type(model).__name__} is not a CLIP-style image-text model")
            _MODELS[key] = ClipEmbedder(model, processor, device)
        except Exception as error:  # noqa: BLE001  (clip_unavailable turns it into a note)
            _MODELS[key] = error
    if isinstance(_MODELS[key], Exception):
        raise _MODELS[key]
    return _MODELS[key]


def try_load_clip(name_or_path: str | None, device: str = "cpu") -> tuple[ClipEmbedder | None, str | None]:
    """(embedder, None), or (None, note saying why there is no CLIP-S); never raises. The warning is logged once."""
    if name_or_path is None:
        return None, "CLIP-S disabled (--clip_model none)."
    first_time = (str(name_or_path), str(device)) not in _MODELS
    try:
        return load_clip(name_or_path, device), None
    except Exception as error:  # noqa: BLE001 - CLIP-S is an extra; nothing may cost the user the other metrics
        reason = describe_load_error(str(name_or_path), error)
        if first_time:
            logger.warning("CLIP-S skipped: could not load --clip_model %r: %s", name_or_path, reason)
        return None, (f"CLIP-S not computed: --clip_model {name_or_path!r} could not be loaded ({reason}). Give a "
                      "local CLIP folder, or run once with access to the Hugging Face hub. The other metrics are still valid.")


def embed_image_source(embedder: ClipEmbedder, images, names: list[str], batch_size: int = IMAGE_BATCH,
                       num_workers: int = 0) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({name: embedding}, {name: why skipped}) for images that were not just captioned (--predictions_file)."""
    source = as_image_source(images)
    loader = data_loader(ImageItems([(name, source, name) for name in names]), batch_size=batch_size,
                         num_workers=num_workers, collate_fn=list)
    embeddings, skipped = {}, {}
    for batch in progress(loader, total=len(loader), desc="CLIP images", unit="batches", logger=logger, leave=False):
        good = [(name, image) for name, image, _ in batch if image is not None]
        skipped.update({name: reason for name, image, reason in batch if image is None})
        embeddings.update(zip([name for name, _ in good], embedder.embed_images([image for _, image in good])))
    return embeddings, skipped


# ---------------------------------------------------------------------------
# The formula (pure: numpy rows in, numbers out)
# ---------------------------------------------------------------------------


def clip_s(image_rows: np.ndarray, caption_rows: np.ndarray) -> np.ndarray:
    """Per-row CLIP-S of normalised image and caption embeddings: WEIGHT * max(cos, 0)."""
    return WEIGHT * np.clip(np.sum(image_rows * caption_rows, axis=1), 0.0, None)


def ref_clip_s(clip_values: np.ndarray, best_reference_cos: np.ndarray) -> np.ndarray:
    """Harmonic mean of CLIP-S and the best caption-reference cosine, that cosine clamped at 0 as in the paper's
    definition (the reference code leaves it unclamped; with CLIP ViT-B/32 caption-caption cosines are positive,
    so the two agree there); 0 where both are 0 instead of the reference code's 0/0."""
    ref = np.clip(best_reference_cos, 0.0, None)
    total = clip_values + ref
    return np.divide(2.0 * clip_values * ref, total, out=np.zeros_like(total), where=total > 0)


def compute_clip_scores(embedder: ClipEmbedder, image_embeddings: dict[str, np.ndarray], predictions: dict[str, str],
                        references: dict[str, list[str]] | None = None) -> tuple[dict, dict[str, dict[str, float]]]:
    """({"clip_score", "ref_clip_score", "clip_images", "clip_note"}, per-image {"clip_score": {name: value}, ...}).

    Scored: the images that have both a caption and an image embedding; RefCLIP-S also needs references
    (None when there are none). The note names images left out.
    """
    names = sorted(n for n in predictions if n in image_embeddings)
    if not names:
        note = "CLIP-S not computed: none of the captioned images could be read for CLIP."
        return {"clip_score": None, "ref_clip_score": None, "clip_images": 0, "clip_note": note}, {}
    captions = embedder.embed_texts([predictions[n] for n in names])
    values = clip_s(np.stack([image_embeddings[n] for n in names]).astype(np.float64), captions)
    per_image = {"clip_score": dict(zip(names, values.tolist()))}
    with_refs = [i for i, n in enumerate(names) if (references or {}).get(n)]
    if with_refs:
        flat = [(i, ref) for i in with_refs for ref in references[names[i]]]
        ref_rows = embedder.embed_texts([ref for _, ref in flat])
        owner = np.array([i for i, _ in flat])
        cosines = np.sum(captions[owner] * ref_rows, axis=1)
        best = np.full(len(names), -np.inf)
        np.maximum.at(best, owner, cosines)
        idx = np.array(with_refs)
        ref_values = ref_clip_s(values[idx], best[idx])
        per_image["ref_clip_score"] = {names[i]: float(v) for i, v in zip(with_refs, ref_values)}
    left_out = len(predictions) - len(names)
    note = (f"CLIP-S of {len(names)} of the {len(predictions)} captioned images: the others' image could not be read "
            "(see the warnings)." if left_out else None)
    metrics = {"clip_score": float(values.mean()),
               "ref_clip_score": float(np.mean(list(per_image["ref_clip_score"].values()))) if with_refs else None,
               "clip_images": len(names), "clip_note": note}
    return metrics, per_image
