"""Validation during --train: the images captioned with the model being trained (from the feature cache when
there is one) and scored with the run's caption protocol."""

import logging
from pathlib import Path

import torch

from models.vision_cache import as_pixel_values
from scripts.report import VAL_PREDICTIONS_NAME, read_val_predictions
from scripts.training_data import VAL_KEY, DataSplits, references_of
from utils import distributed
from utils.config import Config
from utils.feature_store import FeatureStore
from utils.progress import progress

logger = logging.getLogger(__name__)


VAL_PROGRESS = "Validation captioning"


class CaptionScorer:
    """Captions the validation images with the model being trained and scores them (COCO metrics, METEOR, FGD),
    with the run's resolved --caption_tokenizer; `last` keeps the latest full scoring (per-image scores, change)."""

    def __init__(self, processor, splits: DataSplits, config: Config, with_fgd: bool, cache: FeatureStore | None = None):
        self.processor, self.splits, self.config, self.with_fgd, self.cache = processor, splits, config, with_fgd, cache
        self.references = references_of(splits.val)
        # For copied_from_training; a stream is not held in memory, so its captions are not compared.
        self.train_captions = None if splits.train_stream is not None else [e.caption for e in splits.train]
        self.last = None  # the CaptionScores of the latest full scoring (per-image METEOR, paired change)

    def caption(self, model) -> dict[str, str]:
        """Captions of every validation image; each rank captions its share and all get every caption."""
        from scripts.inference import caption_across_ranks, caption_pixel_values

        names = sorted(self.references)
        if self.cache is None:
            return caption_across_ranks(
                model, self.processor, self.splits.val_dir, names, self.config.batch_size,
                self.config.generation_tokens, self.config.num_beams, progress=True, progress_desc=VAL_PROGRESS,
            ).captions
        # From the cached features: no image decoded, no vision tower run (see models/vision_cache.py).
        mine = distributed.split_for_rank([n for n in names if self.cache.is_filled(VAL_KEY + n)])
        captions, was_training = {}, model.training
        model.eval()
        with progress(total=len(mine), desc=VAL_PROGRESS, logger=logger, disable=not distributed.is_main_process()) as bar:
            for start in range(0, len(mine), self.config.batch_size):
                batch = mine[start : start + self.config.batch_size]
                features = as_pixel_values(torch.stack([self.cache.read(VAL_KEY + n) for n in batch]))
                texts = caption_pixel_values(model, self.processor, features, self.config.generation_tokens, self.config.num_beams)
                captions.update(zip(batch, texts))
                bar.update(len(batch))
        model.train(was_training)
        return {name: text for part in distributed.all_gather_object(captions) for name, text in part.items()}

    def __call__(self, model, fgd: bool | None = None, baseline: dict[str, str] | None = None) -> tuple[dict, dict[str, str]]:
        """Every rank captions its share of the images (call it on all ranks); the main process scores the
        gathered captions and every rank gets the same scores, as best-model selection needs."""
        return self.score(self.caption(model), fgd, baseline)

    def score(self, captions: dict[str, str], fgd: bool | None = None,
              baseline: dict[str, str] | None = None) -> tuple[dict, dict[str, str]]:
        """(scores, predictions) of captions from `caption` (call it on all ranks).

        fgd=False is a validation during training: no FGD, no intervals, and METEOR only when
        --metric_for_best_model needs it. baseline: captions of the same images to pair the change with."""
        from utils.evaluation import evaluate_captions

        predictions = {name: captions.get(name, "") for name in self.references}
        config, full = self.config, fgd is not False
        options = dict(caption_tokenizer=config.caption_tokenizer, java=config.java, seed=config.seed, baseline=baseline)
        if not full:
            options.update(meteor=config.metric_for_best_model == "meteor", resamples=0)
        fgd_model = config.fgd_model if (self.with_fgd if fgd is None else fgd) else None
        scores = distributed.run_on_main(lambda: evaluate_captions(predictions, self.references, fgd_model, **options))
        if full:
            self.last = scores
        return {**scores.metrics, **self.statistics(predictions)}, predictions

    def statistics(self, predictions: dict[str, str]) -> dict:
        """Diversity of the validation captions, and the collapse warning (logged) when one caption dominates."""
        from utils.caption_stats import caption_statistics, collapse_warning

        stats = caption_statistics(predictions.values(), self.train_captions)
        warning = collapse_warning(stats)
        if warning and distributed.is_main_process():
            logger.warning("Validation captions: %s", warning)
        return {"caption_stats": stats, "collapse_warning": warning}


def base_captions_of(run_dir: Path) -> dict[str, str] | None:
    """The base model's validation captions a run saved before training (val_predictions.csv), for --resume."""
    rows = read_val_predictions(run_dir / VAL_PREDICTIONS_NAME)
    return {name: r["before"] for name, r in rows.items() if r["before"]} or None
