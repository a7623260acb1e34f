"""Train LoRA adapters on a quantized GIT with the Hugging Face Trainer; writes one self-contained run folder."""

import contextlib
import json
import logging
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.integrations import TensorBoardCallback

from models.caption_speed import fast_vision_tower_for_filling
from models.git_qlora import (
    describe_precision, load_base_model, load_processor, prepare_for_training, release_freed_heap, resolve_base_dtype,
    resolve_compute_dtype, resolve_device, training_autocast, wrapped_lora_layers,
)
from models.vision_cache import (
    as_pixel_values, feature_shape, fill_feature_cache, git_model, plan_feature_cache, vision_from_cache,
)
from models.training_speed import last_layer_over_caption_rows
from scripts.early_stopping import CaptionEarlyStopping
from scripts.report import (
    VAL_PREDICTIONS_NAME, read_val_predictions, save_train_history, save_val_predictions, write_training_report,
)
from utils import distributed
from utils.config import Config, apply_run_settings, find_runs, load_run_config
from utils.dataset_utils import (
    MAX_NAMES_IN_WARNING, CachedFeatureDataset, CaptionCollator, CaptionDataset, Example, FeatureCaptionCollator,
    as_image_source, collect_examples, find_truncated_captions, split_by_image,
)
from utils.errors import UserInputError
from utils.caption_stats import format_caption_stats
from utils.evaluation import format_metrics_table
from utils.feature_store import FeatureStore
from utils.io import give_default_permissions, replace_folder_atomically, write_json_atomic, write_split_file, write_text_atomic
from utils.java_scorers import resolve_caption_tokenizer, start_meteor
from utils.model_card import build_model_card
from utils.progress import progress
from utils.run_lock import LOCK_NAME, lock_folder
from utils.trackers import TrackerRuns
from utils.workers import guard_workers

logger = logging.getLogger(__name__)


# Keys of the feature cache: a training and a validation image may share a name.
TRAIN_KEY, VAL_KEY = "train/", "val/"
VAL_PROGRESS = "Validation captioning"
FILL_BATCH = 16  # images per vision-tower forward while filling the cache (0.128 vs 0.2 s per image at 4, git-base, CPU)


@dataclass
class DataSplits:
    train_dir: Path | object  # an image folder, or an image source such as hf_datasets.DatasetImages
    train: list[Example]
    val_dir: Path | object | None
    val: list[Example]
    train_stream: object | None = None  # --streaming: an IterableDataset used instead of train/train_dir


def library_versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


def prepare_run_dir(config: Config) -> tuple[Config, Path]:
    """Pick the run folder (created later, by `created_run_dir`); never reuse one silently.

    --resume takes the model settings the run saved. The main process decides and every rank gets its
    answer (a timestamp taken on each rank could differ), or the same error.
    """
    return distributed.run_on_main(lambda: _choose_run_dir(config))


def _choose_run_dir(config: Config) -> tuple[Config, Path]:
    if config.resume and config.run_name is None:
        runs = find_runs(config.output_dir)
        if not runs:
            raise UserInputError(f"--resume found no run under --output_dir {config.output_dir}; give --run_name.")
        run_dir = runs[0]
    else:
        run_name = config.run_name or datetime.now().strftime("run-%Y%m%d-%H%M%S")
        run_dir = Path(config.output_dir) / run_name
    config = config.replace(run_name=run_dir.name)
    if config.resume:
        if not (run_dir / "run_config.json").is_file():
            raise UserInputError(f"--resume: {run_dir} holds no run_config.json; it is not a run to resume.")
        config = apply_run_settings(config, load_run_config(run_dir))
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserInputError(
            f"The run folder {run_dir} already exists and is not empty. Choose another --run_name, "
            "or pass --resume to continue that run from its newest checkpoint."
        )
    return config, run_dir


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


@contextmanager
def created_run_dir(run_dir: Path, resume: bool = False):
    """Create the run folder (main process) and lock it for this job (utils/run_lock.py) for the block; if the
    block fails, a folder this call created is removed again, so a run that never started training leaves nothing behind."""
    existed = run_dir.exists()
    distributed.on_main_process(run_dir.mkdir, parents=True, exist_ok=True)
    distributed.barrier()  # the others write checkpoint pieces into it later
    # Outside the try: a folder locked by another job is that job's, never removed here.
    lock_folder(run_dir, "The run folder")
    if not resume:  # another job may have filled it since _choose_run_dir looked
        distributed.run_on_main(lambda: _require_fresh(run_dir))
    logger.info("Run folder: %s", run_dir.resolve())  # only now: a run that failed before never had one
    try:
        yield
    except BaseException:
        if not existed:
            distributed.on_main_process(shutil.rmtree, run_dir, ignore_errors=True)
        raise


def _require_fresh(run_dir: Path) -> None:
    if any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise UserInputError(
            f"The run folder {run_dir} was filled by another job while this one was loading. Choose another "
            "--run_name, or pass --resume to continue that run."
        )


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


def base_captions_of(run_dir: Path) -> dict[str, str] | None:
    """The base model's validation captions a run saved before training (val_predictions.csv), for --resume."""
    rows = read_val_predictions(run_dir / VAL_PREDICTIONS_NAME)
    return {name: r["before"] for name, r in rows.items() if r["before"]} or None


def references_of(examples: list[Example]) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for example in examples:
        refs.setdefault(example.image_name, []).append(example.caption)
    return refs


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


class _EpochDataLoader(DataLoader):
    """A DataLoader the Trainer can tell the epoch, so a streamed dataset reshuffles each pass."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """GIT's training loss from the logits of the caption positions alone (as from logits_to_keep=len(labels)):
    position i predicts token i+1; padding (-100) is ignored. Sum over tokens / num_items_in_batch when given
    (the Trainer's count over an accumulated batch), else the mean, as transformers' causal-LM loss does."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits=logits[:, :-1].contiguous(), labels=None, vocab_size=logits.shape[-1],
                           num_items_in_batch=num_items_in_batch, shift_labels=labels[:, 1:].contiguous())


class CaptionTrainer(Trainer):
    """A Trainer whose evaluation also reports caption metrics, so --metric_for_best_model can pick by them,
    and whose loss skips the LM head over the image positions."""

    def __init__(self, *args, caption_scorer: CaptionScorer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.caption_scorer = caption_scorer
        self.val_captions: dict[int, dict[str, str]] = {}  # step -> captions, the best and the latest evaluation's
        self._flos_parameters: int | None = None  # floating_point_ops' parameter count, taken at its first call

    def floating_point_ops(self, inputs) -> int:
        """The stock count (6 x input tokens x non-embedding parameters, for the log's total_flos), with the
        parameters counted once: the Trainer asks at every step, and counting them walked every module each
        time (0.26 s of the demo's 250 steps)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flos_parameters is None:
            self._flos_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self._flos_parameters

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # GIT computes logits for its 197 image positions too and then drops them: with a 30,522-word LM head
        # that is most of a step's work and memory. Only the caption positions get logits here.
        # Those logits read only the caption rows of the last decoder layer, so that layer computes only them.
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        with last_layer_over_caption_rows(model, labels.shape[1]):
            outputs = model(**inputs, logits_to_keep=labels.shape[1], use_cache=False)
        loss = caption_loss(outputs.logits, labels, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def get_train_dataloader(self):
        # A stream that splits itself across ranks (hf_datasets.StreamingCaptionDataset) must not be split
        # again, or dispatched from rank 0, by Accelerate.
        if getattr(self.train_dataset, "split_by_rank", False) and distributed.world_size() > 1:
            return guard_workers(_EpochDataLoader(self.train_dataset, batch_size=self._train_batch_size,
                                                  collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers))
        return guard_workers(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return guard_workers(super().get_eval_dataloader(eval_dataset))

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if self.caption_scorer is not None:
            best = final_model_step(self.state)
            self.val_captions = {step: c for step, c in self.val_captions.items() if step == best}
            self.val_captions[self.state.global_step] = captions = self.caption_scorer.caption(self.model)
            scores, _ = self.caption_scorer.score(captions, fgd=False)
            extra = {f"eval_{k}": v for k, v in scores.items() if isinstance(v, float)}
            metrics.update(extra)
            self.log(extra)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, CaptionEarlyStopping):  # it judges once every metric is in
                callback.judge(self.args, self.state, self.control, metrics)
        return metrics


class LogToLogging(TrainerCallback):
    """The Trainer's log dictionaries through `logging` on stderr; stdout stays for what the user asked for."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())
            logger.info("step %d: %s", state.global_step, values)


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bar without its print of every log dictionary to stdout."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class ReadableCheckpoints(TrainerCallback):
    """Checkpoint files with the permissions of the rest of the run (safetensors writes them 0600)."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            give_default_permissions(folder)


class StepTimer(TrainerCallback):
    """Wall time of optimizer steps, for seconds per step and images per second."""

    def __init__(self):
        self.seconds, self.steps, self._start = 0.0, 0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.steps += 1


def build_training_args(config: Config, run_dir: Path, has_val: bool, device: str, autocast: str | None) -> TrainingArguments:
    strategy = "steps" if config.eval_steps else "epoch"
    metric = config.metric_for_best_model
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        gradient_accumulation_steps=config.gradient_accumulation,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps in transformers 5
        weight_decay=config.weight_decay,
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy=strategy if has_val else "no",
        save_strategy=strategy,
        eval_steps=config.eval_steps,
        save_steps=config.eval_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model=metric if has_val else None,
        greater_is_better=metric != "loss" if has_val else None,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        # The Trainer's own MLflow / W&B integrations; TensorBoard is added as a callback writing to RUN/logs.
        report_to=[n for n in config.report_to if n in ("mlflow", "wandb")] or "none",
        run_name=config.run_name,
        remove_unused_columns=False,  # the collator builds GIT's inputs from images and captions
        dataloader_num_workers=config.num_workers,
        use_cpu=device == "cpu",
        disable_tqdm=not sys.stderr.isatty(),  # in a log file, the step lines below say how far it got
        bf16=autocast == "bf16",
        fp16=autocast == "fp16",  # autocast plus the Trainer's loss scaling
        # Several processes: DDP over the LoRA weights, every one of which gets a gradient each step.
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if device == "cpu" and distributed.is_distributed() else None,
    )


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def save_final_model(model, processor, run_dir: Path) -> Path:
    """Adapter + processor into RUN/final_model, written to a temporary folder first and renamed."""
    final, tmp = run_dir / "final_model", run_dir / ".final_model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    processor.save_pretrained(str(tmp))
    # Self-contained, as litgpt's checkpoints are: the folder alone names its base and how to load it.
    shutil.copy2(run_dir / "run_config.json", tmp / "run_config.json")
    write_model_card(run_dir, tmp)  # replaces PEFT's empty template; written again once the metrics are in
    replace_folder_atomically(tmp, final)
    return final


def write_model_card(run_dir: Path, folder: Path | None = None, merge_report: dict | None = None) -> None:
    """FOLDER/README.md (default RUN/final_model) from run_config.json and metrics.json (when there are metrics yet)."""
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
    card = build_model_card(load_run_config(run_dir), metrics, str(run_dir), merge_report)
    write_text_atomic((folder or run_dir / "final_model") / "README.md", card)


def effective_batch_size(config: Config) -> int:
    """Images per optimizer step over all processes."""
    return config.batch_size * config.gradient_accumulation * distributed.world_size()


def write_run_config(config: Config, run_dir: Path, device: str, splits: DataSplits, truncated: int) -> None:
    settings = config.to_json_dict()
    settings.update(
        base_model=config.model_name, device=device, precision=describe_precision(config, device),
        compute_dtype=str(resolve_compute_dtype(config, device)).replace("torch.", ""),
        training_autocast=training_autocast(config, device),
        world_size=distributed.world_size(), effective_batch_size=effective_batch_size(config),
        library_versions=library_versions(), created=datetime.now().isoformat(timespec="seconds"),
        num_train_examples=None if splits.train_stream is not None else len(splits.train), num_val_examples=len(splits.val),
        truncated_train_captions=truncated,
        val_dir=str(splits.val_dir) if splits.val else None,
        # The names themselves in RUN/splits/ (megabytes at a million images); here their count and hash.
        splits={"validation": write_split_file(run_dir, "validation", {e.image_name for e in splits.val})},
    )
    if splits.train_stream is None:
        settings["splits"]["train"] = write_split_file(run_dir, "train", {e.image_name for e in splits.train})
    write_json_atomic(run_dir / "run_config.json", settings)


def record_resume(config: Config, run_dir: Path) -> None:
    """Append this session's changed settings to run_config.json, so the run's record stays true."""
    saved = load_run_config(run_dir)
    changed = {
        key: {"was": saved[key], "now": value} for key, value in config.to_json_dict().items()
        if key in saved and key not in ("mode", "resume") and saved[key] != value
    }
    if changed:
        logger.info("--resume with changed settings: %s", ", ".join(f"{k} {v['was']} -> {v['now']}" for k, v in changed.items()))
    saved.setdefault("resumes", []).append({"at": datetime.now().isoformat(timespec="seconds"), "changed": changed})
    write_json_atomic(run_dir / "run_config.json", saved)


def warn_truncated_captions(processor, examples: list[Example], max_length: int) -> int:
    """How many training captions --max_length cuts; a warning names a few."""
    cut = find_truncated_captions(processor.tokenizer, [e.caption for e in examples], max_length)
    if cut:
        logger.warning(
            "%d of %d training captions are longer than --max_length %d tokens and are cut short, e.g. %r. "
            "Raise --max_length to train on them whole.", len(cut), len(examples), max_length, cut[0],
        )
    return len(cut)


def log_settings(config: Config, device: str) -> None:
    logger.info("Precision: %s", describe_precision(config, device))
    logger.info(
        "Processes: %d; effective batch %d images per optimizer step (batch_size %d x gradient_accumulation %d x %d)",
        distributed.world_size(), effective_batch_size(config), config.batch_size, config.gradient_accumulation,
        distributed.world_size(),
    )
    logger.info("Settings: %s", json.dumps(config.to_json_dict(), sort_keys=True))


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


def train(config: Config) -> int:
    """--train: fit LoRA adapters, write RUN/{run_config.json, final_model, checkpoints, logs, metrics.json}.

    Under torchrun / accelerate launch every rank runs this; the main process alone writes the run folder's
    files (the Trainer's checkpoints hold one RNG state per rank).
    """
    trackers = TrackerRuns(config.report_to)  # --report_to mlflow / wandb
    try:
        return _train(config, trackers)
    except BaseException:
        distributed.on_main_process(trackers.end, failed=True)
        raise


def _train(config: Config, trackers: TrackerRuns) -> int:
    config, run_dir = prepare_run_dir(config)
    if config.resume:  # the folder exists: no other job may write it from here on, before anything loads
        lock_folder(run_dir, "The run folder")
    # Resolved once for the run (and so recorded in run_config.json): every validation uses the same protocol.
    tokenizer = distributed.run_on_main(lambda: resolve_caption_tokenizer(config.caption_tokenizer, config.java))
    config = config.replace(caption_tokenizer=tokenizer)
    device = resolve_device()
    log_settings(config, device)
    # Data and model are checked before the run folder exists, so a bad flag leaves no folder behind.
    splits = load_splits(config)
    if splits.val:  # METEOR's Java start (10-30 s) overlaps loading the model; every validation then reuses it
        distributed.on_main_process(start_meteor, config.java)
    processor = load_processor(config.model_name, config.trust_remote_code)
    base = load_base_model(config, device)
    # PEFT draws LoRA's initial A matrices from torch's generator, which starts from a fresh seed in every process
    # (torch 2.14: `python -c "import torch; print(torch.initial_seed())"` differs run to run): --seed decides them.
    set_seed(config.seed)
    model = prepare_for_training(base, config)
    truncated = warn_truncated_captions(processor, splits.train, config.max_length)
    precision = describe_precision(config, device)
    metrics = {"run_dir": str(run_dir), "device": device, "precision": precision,
               "world_size": distributed.world_size(), "effective_batch_size": effective_batch_size(config),
               "caption_tokenizer": config.caption_tokenizer,
               "before_model": f"the base without the adapter, as trained on: {precision}",
               "after_model": "the same base with the trained adapter"}
    with created_run_dir(run_dir, config.resume):
        if config.resume:
            distributed.on_main_process(record_resume, config, run_dir)
        else:
            distributed.on_main_process(write_run_config, config, run_dir, device, splits, truncated)
        cache, cache_seconds = prepare_feature_cache(config, run_dir, model, processor, splits, device)
        scorer = CaptionScorer(processor, splits, config, bool(config.fgd_model), cache) if splits.val else None
        trainer, timer = build_trainer(config, run_dir, model, processor, splits, scorer, device, cache)
        log_data_shards(trainer, splits.train)
        # Opened before training, so the Trainer's own integration logs its steps into this run.
        distributed.on_main_process(trackers.start, config.run_name, run_dir, load_run_config(run_dir))
    with vision_from_cache(model) if cache is not None else contextlib.nullcontext():
        if scorer is not None and not config.resume:
            metrics["before"], before_captions = scorer(model)
            logger.info("Validation caption metrics of the base before training (%s):\n%s", precision,
                        format_metrics_table(metrics["before"]))
            distributed.on_main_process(write_json_atomic, run_dir / "metrics.json", metrics)  # kept for --resume
            distributed.on_main_process(save_val_predictions, run_dir, before=before_captions)  # the report's base captions
        checkpoint = latest_checkpoint(run_dir) if config.resume else None
        # Scoring before training draws from the random generators (DataLoader seeds); reseeding makes
        # the training itself (dropout masks, data order) the same whatever ran before it.
        set_seed(config.seed)
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics.update(training_metrics(result, timer, time.perf_counter() - start, cache_seconds, config, device))
        stopped = early_stopping_summary(trainer)
        if stopped is not None:
            metrics["early_stopping"] = stopped
        final = distributed.on_main_process(save_final_model, trainer.model, processor, run_dir)
        if scorer is not None:
            baseline = before_captions if not config.resume else base_captions_of(run_dir)
            metrics["val_loss"], metrics["after"], predictions = final_validation(trainer, scorer, baseline)
            if scorer.last is not None and scorer.last.change is not None:
                metrics["change"] = scorer.last.change  # paired intervals of after - before, same images
            metrics["sample_captions"] = dict(list(predictions.items())[:5])
    if cache is not None:
        distributed.barrier()  # every rank is done reading it
        distributed.on_main_process(cache.remove)  # as large as the images' features; --resume encodes them again
    distributed.on_main_process(finish_metrics, run_dir, metrics)
    distributed.on_main_process(write_report_records, run_dir, trainer, splits, scorer, predictions if scorer is not None else None)
    distributed.on_main_process(write_model_card, run_dir)  # now with the validation metrics
    distributed.on_main_process(finish_tracking, trackers, run_dir)
    logger.info("Adapter saved to %s", final)
    logger.info("Run folder: %s", run_dir.resolve())
    return 0


def final_model_step(state) -> int:
    """The step whose weights the Trainer leaves in the model: the best checkpoint's, which it loads at the end."""
    suffix = Path(state.best_model_checkpoint or "").name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else state.global_step


def final_validation(trainer: CaptionTrainer, scorer: CaptionScorer,
                     baseline: dict[str, str] | None = None) -> tuple[float, dict, dict[str, str]]:
    """(loss, scores, captions) of the final model on the validation images. The training's evaluation of the
    same weights is reused (its loss from the log history, its captions when it captioned), so the last
    validation pass is not run a second time; only what it did not compute is computed (call it on all ranks)."""
    step = final_model_step(trainer.state)
    losses = {e.get("step"): e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    loss = losses[step] if step in losses else Trainer.evaluate(trainer)["eval_loss"]
    captions = trainer.val_captions.get(step)
    scores, predictions = scorer.score(captions if captions is not None else scorer.caption(trainer.model), baseline=baseline)
    return loss, scores, predictions


def finish_metrics(run_dir: Path, metrics: dict) -> None:
    metrics = merge_previous_metrics(run_dir, metrics)
    if "after" in metrics:
        before_after = (metrics["before"], metrics["after"]) if "before" in metrics else (metrics["after"],)
        logger.info("Validation caption metrics, the base before vs with the adapter after training:\n%s\n%s",
                    format_metrics_table(*before_after, change=metrics.get("change")),
                    format_caption_stats(*(m.get("caption_stats") or {} for m in before_after)))
    write_json_atomic(run_dir / "metrics.json", metrics)


def finish_tracking(trackers: TrackerRuns, run_dir: Path) -> None:
    """The final metrics.json (caption metrics before/after, early stopping) and the run's records to the trackers."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    trackers.log_final(metrics, [run_dir / "run_config.json", run_dir / "metrics.json", run_dir / "final_model" / "README.md"])
    trackers.end()


def write_report_records(run_dir: Path, trainer, splits: DataSplits, scorer, after_captions) -> None:
    """RUN/train_history.json, the validation captions after training, and RUN/report.html (with validation images)."""
    save_train_history(run_dir, trainer.state.log_history)
    if scorer is not None:
        save_val_predictions(run_dir, after=after_captions)
        per_image = scorer.last.per_image if scorer.last is not None else None
        write_training_report(run_dir, splits.val_dir, scorer.references, trainer.args.seed, per_image)


def log_data_shards(trainer: Trainer, examples: list[Example]) -> None:
    """Log, from the Trainer's own sampler, how many examples each rank trains on per epoch and its first batch.

    Reads the sampler's indices only (no image is loaded); one line per rank, from the main process.
    """
    if isinstance(trainer.train_dataset, torch.utils.data.IterableDataset):
        return  # a stream: utils/hf_datasets.py splits its shards by rank and says so
    examples = getattr(trainer.train_dataset, "examples", examples)  # the cache leaves out unreadable images
    batches = list(trainer.get_train_dataloader().batch_sampler)
    first = [examples[i].image_name for i in batches[0]] if batches else []
    shards = distributed.all_gather_object((sum(len(b) for b in batches), first))
    for rank, (count, names) in enumerate(shards):
        logger.info("Rank %d trains on %d examples per epoch; first batch: %s", rank, count, ", ".join(names))


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


def build_trainer(config, run_dir, model, processor, splits, scorer, device, cache=None):
    train_data, val_data, collator = build_datasets(config, processor, splits, cache)
    if cache is not None:  # reading cached rows is cheaper than starting worker processes
        config = config.replace(num_workers=0)
    args = build_training_args(config, run_dir, val_data is not None, device, training_autocast(config, device))
    timer = StepTimer()
    tensorboard = None
    if "tensorboard" in config.report_to:
        tensorboard = distributed.on_main_process(tensorboard_callback, run_dir)  # one events file, from rank 0
    trainer = CaptionTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=val_data,
        data_collator=collator,
        callbacks=[c for c in (tensorboard, timer, ReadableCheckpoints(), early_stopping_callback(config, val_data is not None))
                   if c is not None],
        caption_scorer=scorer if config.metric_for_best_model != "loss" else None,
    )
    for printing in (PrinterCallback, ProgressCallback):
        if trainer.pop_callback(printing) is not None and printing is ProgressCallback:
            trainer.add_callback(QuietProgressCallback())
    trainer.add_callback(LogToLogging())
    return trainer, timer


def early_stopping_callback(config: Config, has_val: bool) -> CaptionEarlyStopping | None:
    if not config.early_stopping_patience:
        return None
    if not has_val:
        raise UserInputError("--early_stopping_patience watches the validation metric, but there are no validation "
                             "images (none could be read or held out); give --test_dir or leave it at 0.")
    return CaptionEarlyStopping(config.early_stopping_patience, config.early_stopping_threshold)


def early_stopping_summary(trainer: Trainer) -> dict | None:
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, CaptionEarlyStopping)), None)
    return callback.summary() if callback is not None else None


def tensorboard_callback(run_dir: Path) -> TensorBoardCallback:
    (run_dir / "logs").mkdir(exist_ok=True)
    tensorboard = TensorBoardCallback(tb_writer=SummaryWriter(str(run_dir / "logs")))
    tensorboard.logging_dir = str(run_dir / "logs")  # where it reopens its writer after training ends
    return tensorboard


def latest_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = run_dir / "checkpoints"
    checkpoint = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if checkpoint is None:
        logger.warning("--resume: no checkpoint in %s yet; training starts from the beginning.", folder)
    else:
        logger.info("Resuming from %s", checkpoint)
    return checkpoint


def training_metrics(result, timer: StepTimer, seconds: float, cache_seconds: float, config: Config, device: str) -> dict:
    """Speed counts every second of this session's training: filling the feature cache, steps, evaluations, saving."""
    images_per_step = effective_batch_size(config)  # all processes: the step time is the slowest rank's
    all_seconds = seconds + cache_seconds
    per_step = all_seconds / timer.steps if timer.steps else None
    return {
        "train_loss": result.training_loss,
        "global_step": result.global_step,
        "train_seconds": all_seconds,
        "feature_cache_seconds": cache_seconds,
        "seconds_per_step": per_step,
        "train_images_per_second": images_per_step / per_step if per_step else None,
        "optimizer_step_seconds": timer.seconds / timer.steps if timer.steps else None,
        "peak_memory_mb": peak_memory_mb(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process max RSS",
    }


def merge_previous_metrics(run_dir: Path, metrics: dict) -> dict:
    """On --resume keep the 'before' metrics of the first session."""
    path = run_dir / "metrics.json"
    if path.is_file() and "before" not in metrics:
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
            if "before" in previous:
                metrics["before"] = previous["before"]
        except ValueError:
            logger.warning("%s is not valid JSON; the metrics from before training are lost.", path)
    return metrics
