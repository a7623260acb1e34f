"""What --train reads: the training and validation examples (folders, caption files, hub datasets, streams)
and, when --cache_image_features allows, the feature cache its steps read instead of the images."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.caption_speed import fast_vision_tower_for_filling
from models.git_qlora import release_freed_heap, resolve_base_dtype, training_autocast, wrapped_lora_layers
from models.vision_cache import feature_shape, fill_feature_cache, git_model, plan_feature_cache
from utils import distributed
from utils.config import Config
from utils.dataset_utils import (
    MAX_NAMES_IN_WARNING, CachedFeatureDataset, CaptionCollator, CaptionDataset, Example, FeatureCaptionCollator,
    as_image_source, collect_examples, find_truncated_captions, split_by_image,
)
from utils.errors import UserInputError
from utils.feature_store import FeatureStore

logger = logging.getLogger(__name__)


# Keys of the feature cache: a training and a validation image may share a name.
TRAIN_KEY, VAL_KEY = "train/", "val/"
FILL_BATCH = 16  # images per vision-tower forward while filling the cache (0.128 vs 0.2 s per image at 4, git-base, CPU)


@dataclass
class DataSplits:
    train_dir: Path | object  # an image folder, or an image source such as hf_datasets.DatasetImages
    train: list[Example]
    val_dir: Path | object | None
    val: list[Example]
    train_stream: object | None = None  # --streaming: an IterableDataset used instead of train/train_dir


def load_splits(config: Config) -> DataSplits:
    """Training examples, plus validation from --test_dir or a held-out share of the training images."""
    if config.dataset is not None:
        return load_dataset_splits(config)
    examples = collect_examples(config.train_dir, config.captions_file, "--train_dir", config.allow_partial_captions)
    if config.test_dir is not None:
        val = collect_examples(config.test_dir, config.captions_file, "--test_dir", config.allow_partial_captions)
        return DataSplits(Path(config.train_dir), examples, Path(config.test_dir), val)
    train, val = split_by_image(examples, config.split_ratio, config.seed)
    return DataSplits(Path(config.train_dir), train, Path(config.train_dir), val)


def load_dataset_splits(config: Config) -> DataSplits:
    """--dataset: training rows (or a stream), validation from --test_dir, an eval split or a hold-out."""
    from utils.hf_datasets import DatasetSpec, load_streaming_train, load_train_and_eval

    spec = DatasetSpec.from_config(config)
    if config.streaming:
        stream, val = load_streaming_train(spec)
        train = None
        if config.eval_steps is None:
            logger.warning("--streaming without --eval_steps: validation and checkpoints happen only when a pass over "
                           "the stream ends; pass --eval_steps N to validate and checkpoint every N steps.")
    else:
        train, val = load_train_and_eval(spec, hold_out=config.test_dir is None)
    if config.test_dir is not None:
        val_examples = collect_examples(config.test_dir, config.captions_file, "--test_dir", config.allow_partial_captions)
        val_dir = Path(config.test_dir)
    else:
        val_examples, val_dir = (val.examples, val.images) if val is not None else ([], None)
    if train is None:
        return DataSplits(None, [], val_dir, val_examples, train_stream=stream)
    return DataSplits(train.images, train.examples, val_dir, val_examples)


def references_of(examples: list[Example]) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for example in examples:
        refs.setdefault(example.image_name, []).append(example.caption)
    return refs


def effective_batch_size(config: Config) -> int:
    """Images per optimizer step over all processes."""
    return config.batch_size * config.gradient_accumulation * distributed.world_size()


def warn_truncated_captions(processor, examples: list[Example], max_length: int) -> int:
    """How many training captions --max_length cuts; a warning names a few."""
    cut = find_truncated_captions(processor.tokenizer, [e.caption for e in examples], max_length)
    if cut:
        logger.warning(
            "%d of %d training captions are longer than --max_length %d tokens and are cut short, e.g. %r. "
            "Raise --max_length to train on them whole.", len(cut), len(examples), max_length, cut[0],
        )
    return len(cut)


def prepare_feature_cache(config: Config, run_dir: Path, model, processor, splits: DataSplits, device: str):
    """Encode every training and validation image once, when --cache_image_features allows (see models/vision_cache.py).

    Returns (store or None, seconds spent filling it); unreadable images are named in a warning.
    """
    if splits.train_stream is not None:
        logger.info("Image feature cache off: --streaming reads each image as it comes")
        return None, 0.0
    train_images, val_images = as_image_source(splits.train_dir), as_image_source(splits.val_dir)
    sources = [(TRAIN_KEY + n, train_images, n) for n in sorted({e.image_name for e in splits.train})]
    sources += [(VAL_KEY + n, val_images, n) for n in sorted({e.image_name for e in splits.val})]
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(training_autocast(config, device))
    dtype = autocast or resolve_base_dtype(config, device)
    examples_seen = config.max_steps * effective_batch_size(config) if config.max_steps > 0 else config.epochs * len(splits.train)
    passes = examples_seen / max(1, len(sources))
    folder = run_dir / "feature_cache" / f"node-{distributed.node_rank()}"
    plan = plan_feature_cache(config.cache_image_features, wrapped_lora_layers(model), len(sources), passes,
                              feature_shape(model), dtype, folder)
    logger.info("Image feature cache %s: %s", "on" if plan.use else "off", plan.reason)
    if not plan.use:
        return None, 0.0
    start = time.perf_counter()
    # What the features depend on; the tower's own dtype too (runs of an earlier version computed it in fp32).
    tower_dtype = git_model(model).image_encoder.vision_model.post_layernorm.weight.dtype
    source = f"{config.model_name}|{config.quantization_bits}|{config.bnb_4bit_quant_type}|{dtype}|tower {tower_dtype}"
    with distributed.local_main_first():  # one process per machine creates (or checks) the files, the others then open them
        store = FeatureStore(folder, [key for key, _, _ in sources], feature_shape(model), dtype, source,
                             verify=distributed.local_rank() == 0)
    if distributed.local_rank() == 0:  # the process that checked this machine's cache
        log_cache_reuse(store, config.resume)
    # Encoding has no backward pass to hold activations for: larger batches use the matrix units better.
    batch = max(config.batch_size, FILL_BATCH)
    share = -(-len(sources) // distributed.local_world_size())
    with fast_vision_tower_for_filling(model, config.compile, config.caption_precision, device, share, batch, dtype):
        skipped = fill_feature_cache(model, processor, store, sources, batch, config.num_workers, autocast)
    release_freed_heap()  # the filling's tower copy and batches, below glibc's mmap threshold, would stay resident
    for key, reason in sorted(skipped.items())[:MAX_NAMES_IN_WARNING]:
        logger.warning("Skipping %s: %s", key, reason)
    return store, time.perf_counter() - start


def log_cache_reuse(store: FeatureStore, resume: bool) -> None:
    """What an earlier session's cache gave this one: rows reused, rows that failed their checksum, or why it was rebuilt."""
    if store.rebuilt not in (None, "no cache yet"):
        logger.warning("The feature cache in %s cannot be trusted (%s): it is rebuilt from the images.", store.folder, store.rebuilt)
    if store.refilled:
        logger.warning("Feature cache %s: %d row(s) did not match their checksum (zeroed or torn by an interrupted "
                       "write) and are encoded again.", store.folder, store.refilled)
    if resume:
        logger.info("--resume: the feature cache reuses %d of %d rows; %d to encode.", store.reused, len(store.keys),
                    len(store.keys) - store.reused)


def build_datasets(config: Config, processor, splits: DataSplits, cache: FeatureStore | None):
    """(train, eval or None, collator): decoded images, or the cached features of models/vision_cache.py."""
    if cache is None:
        train = splits.train_stream if splits.train_stream is not None else CaptionDataset(splits.train_dir, splits.train)
        val = CaptionDataset(splits.val_dir, splits.val) if splits.val else None
        return train, val, CaptionCollator(processor, config.max_length)
    train = CachedFeatureDataset(cache, TRAIN_KEY, splits.train)
    val = CachedFeatureDataset(cache, VAL_KEY, splits.val) if splits.val else None
    if not len(train):
        raise UserInputError(f"--train_dir {config.train_dir}: no training image could be read; see the warnings above.")
    return train, val if val is not None and len(val) else None, FeatureCaptionCollator(processor.tokenizer, config.max_length)
