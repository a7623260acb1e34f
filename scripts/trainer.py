"""Train LoRA adapters on a quantized GIT with the Hugging Face Trainer; writes one self-contained run folder."""

import contextlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch
from transformers import Trainer, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from models.git_qlora import (
    describe_precision, load_base_model, load_processor, prepare_for_training, resolve_compute_dtype, resolve_device,
    training_autocast,
)
from models.vision_cache import vision_from_cache
from scripts.caption_trainer import (
    CaptionTrainer, LogToLogging, QuietProgressCallback, ReadableCheckpoints, StepTimer, build_training_args,
    early_stopping_callback, early_stopping_summary, final_model_step, tensorboard_callback,
)
from scripts.report import save_train_history, save_val_predictions, write_training_report
from scripts.training_data import (
    DataSplits, build_datasets, effective_batch_size, load_splits, prepare_feature_cache, warn_truncated_captions,
)
from scripts.validation import CaptionScorer, base_captions_of
from utils import distributed
from utils.caption_stats import format_caption_stats
from utils.config import Config, apply_run_settings, find_runs, load_run_config
from utils.dataset_utils import Example
from utils.errors import UserInputError
from utils.evaluation import format_metrics_table
from utils.io import replace_folder_atomically, write_json_atomic, write_split_file, write_text_atomic
from utils.java_scorers import resolve_caption_tokenizer, start_meteor
from utils.model_card import build_model_card
from utils.run_lock import LOCK_NAME, lock_folder
from utils.trackers import TrackerRuns

logger = logging.getLogger(__name__)


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


def log_settings(config: Config, device: str) -> None:
    logger.info("Precision: %s", describe_precision(config, device))
    logger.info(
        "Processes: %d; effective batch %d images per optimizer step (batch_size %d x gradient_accumulation %d x %d)",
        distributed.world_size(), effective_batch_size(config), config.batch_size, config.gradient_accumulation,
        distributed.world_size(),
    )
    logger.info("Settings: %s", json.dumps(config.to_json_dict(), sort_keys=True))


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
