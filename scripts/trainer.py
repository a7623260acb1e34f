"""Train LoRA adapters on a quantized GIT with the Hugging Face Trainer; writes one self-contained run folder."""

import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from models.git_qlora import (
    describe_precision, load_base_model, load_processor, prepare_for_training, resolve_compute_dtype, resolve_device,
)
from utils import distributed
from utils.config import Config, apply_run_settings, find_runs, load_run_config
from utils.dataset_utils import CaptionCollator, CaptionDataset, Example, collect_examples, split_by_image
from utils.errors import UserInputError
from utils.io import replace_folder_atomically, write_json_atomic

logger = logging.getLogger(__name__)


@dataclass
class DataSplits:
    train_dir: Path
    train: list[Example]
    val_dir: Path
    val: list[Example]


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
def created_run_dir(run_dir: Path):
    """Create the run folder (main process) for the block; if the block fails, a folder this call created is
    removed again, so a run that never started training leaves nothing behind."""
    existed = run_dir.exists()
    distributed.on_main_process(run_dir.mkdir, parents=True, exist_ok=True)
    distributed.barrier()  # the others write checkpoint pieces into it later
    try:
        yield
    except BaseException:
        if not existed:
            distributed.on_main_process(shutil.rmtree, run_dir, ignore_errors=True)
        raise


def load_splits(config: Config) -> DataSplits:
    """Training examples, plus validation from --test_dir or a held-out share of the training images."""
    examples = collect_examples(config.train_dir, config.captions_file, flag="--train_dir")
    if config.test_dir is not None:
        val = collect_examples(config.test_dir, config.captions_file, flag="--test_dir")
        return DataSplits(Path(config.train_dir), examples, Path(config.test_dir), val)
    train, val = split_by_image(examples, config.split_ratio, config.seed)
    return DataSplits(Path(config.train_dir), train, Path(config.train_dir), val)


def references_of(examples: list[Example]) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for example in examples:
        refs.setdefault(example.image_name, []).append(example.caption)
    return refs


class CaptionScorer:
    """Captions the validation images with the model being trained and scores them (COCO metrics, FGD)."""

    def __init__(self, processor, splits: DataSplits, config: Config, with_fgd: bool):
        self.processor, self.splits, self.config, self.with_fgd = processor, splits, config, with_fgd
        self.references = references_of(splits.val)

    def __call__(self, model, fgd: bool | None = None) -> tuple[dict, dict[str, str]]:
        """Every rank captions its share of the images (call it on all ranks); the main process scores the
        gathered captions and every rank gets the same scores, as best-model selection needs."""
        from scripts.inference import caption_across_ranks
        from utils.evaluation import compute_caption_metrics, score_captions

        result = caption_across_ranks(
            model, self.processor, self.splits.val_dir, sorted(self.references), self.config.batch_size,
            self.config.max_new_tokens, self.config.num_beams, progress=False,
        )
        predictions = {name: result.captions.get(name, "") for name in self.references}
        if self.with_fgd if fgd is None else fgd:
            scores = distributed.run_on_main(lambda: score_captions(predictions, self.references, self.config.fgd_model))
        else:
            scores = distributed.run_on_main(lambda: compute_caption_metrics(predictions, self.references))
        return scores, predictions


class CaptionTrainer(Trainer):
    """A Trainer whose evaluation also reports caption metrics, so --metric_for_best_model can pick by them."""

    def __init__(self, *args, caption_scorer: CaptionScorer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.caption_scorer = caption_scorer

    def evaluate(self, *args, **kwargs):
        metrics = super().evaluate(*args, **kwargs)
        if self.caption_scorer is not None:
            scores, _ = self.caption_scorer(self.model, fgd=False)
            extra = {f"eval_{k}": v for k, v in scores.items() if isinstance(v, float)}
            metrics.update(extra)
            self.log(extra)
        return metrics


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


def build_training_args(config: Config, run_dir: Path, has_val: bool, device: str, bf16: bool) -> TrainingArguments:
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
        report_to="none",  # TensorBoard is added as a callback writing to RUN/logs
        remove_unused_columns=False,  # the collator builds GIT's inputs from images and captions
        dataloader_num_workers=config.num_workers,
        use_cpu=device == "cpu",
        bf16=bf16,
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
    replace_folder_atomically(tmp, final)
    return final


def effective_batch_size(config: Config) -> int:
    """Images per optimizer step over all processes."""
    return config.batch_size * config.gradient_accumulation * distributed.world_size()


def write_run_config(config: Config, run_dir: Path, device: str, splits: DataSplits) -> None:
    settings = config.to_json_dict()
    settings.update(
        base_model=config.model_name, device=device, precision=describe_precision(config, device),
        world_size=distributed.world_size(), effective_batch_size=effective_batch_size(config),
        library_versions=library_versions(), created=datetime.now().isoformat(timespec="seconds"),
        num_train_examples=len(splits.train), num_val_examples=len(splits.val),
        val_dir=str(splits.val_dir) if splits.val else None,
        val_images=sorted({e.image_name for e in splits.val}),
    )
    write_json_atomic(run_dir / "run_config.json", settings)


def log_settings(config: Config, run_dir: Path, device: str) -> None:
    logger.info("Run folder: %s", run_dir.resolve())
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
    config, run_dir = prepare_run_dir(config)
    device = resolve_device()
    log_settings(config, run_dir, device)
    # Data and model are checked before the run folder exists, so a bad flag leaves no folder behind.
    splits = load_splits(config)
    processor = load_processor(config.model_name, config.trust_remote_code)
    model = prepare_for_training(load_base_model(config, device), config)
    metrics = {"run_dir": str(run_dir), "device": device, "precision": describe_precision(config, device),
               "world_size": distributed.world_size(), "effective_batch_size": effective_batch_size(config)}
    with created_run_dir(run_dir):
        if not config.resume:
            distributed.on_main_process(write_run_config, config, run_dir, device, splits)
        scorer = CaptionScorer(processor, splits, config, with_fgd=bool(config.fgd_model)) if splits.val else None
        trainer, timer = build_trainer(config, run_dir, model, processor, splits, scorer, device)
        log_data_shards(trainer, splits.train)
        if scorer is not None and not config.resume:
            metrics["before"], _ = scorer(model)
            logger.info("Validation caption metrics before training: %s", metrics["before"])
            distributed.on_main_process(write_json_atomic, run_dir / "metrics.json", metrics)  # kept for --resume
    checkpoint = latest_checkpoint(run_dir) if config.resume else None
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics.update(training_metrics(result, timer, time.perf_counter() - start, config, device))
    final = distributed.on_main_process(save_final_model, trainer.model, processor, run_dir)
    if scorer is not None:
        metrics["val_loss"] = Trainer.evaluate(trainer)["eval_loss"]
        metrics["after"], predictions = scorer(trainer.model)
        metrics["sample_captions"] = dict(list(predictions.items())[:5])
        logger.info("Validation caption metrics after training: %s", metrics["after"])
    distributed.on_main_process(lambda: write_json_atomic(run_dir / "metrics.json", merge_previous_metrics(run_dir, metrics)))
    logger.info("Adapter saved to %s", final)
    logger.info("Run folder: %s", run_dir.resolve())
    return 0


def log_data_shards(trainer: Trainer, examples: list[Example]) -> None:
    """Log, from the Trainer's own sampler, how many examples each rank trains on per epoch and its first batch.

    Reads the sampler's indices only (no image is loaded); one line per rank, from the main process.
    """
    batches = list(trainer.get_train_dataloader().batch_sampler)
    first = [examples[i].image_name for i in batches[0]] if batches else []
    shards = distributed.all_gather_object((sum(len(b) for b in batches), first))
    for rank, (count, names) in enumerate(shards):
        logger.info("Rank %d trains on %d examples per epoch; first batch: %s", rank, count, ", ".join(names))


def build_trainer(config, run_dir, model, processor, splits, scorer, device):
    # prepare_model_for_kbit_training upcasts the unquantized weights to fp32; bf16 autocast keeps GPU speed.
    bf16 = device == "cuda" and config.quantization_bits != 32 and resolve_compute_dtype(config, device) == torch.bfloat16
    args = build_training_args(config, run_dir, bool(splits.val), device, bf16)
    timer = StepTimer()
    tensorboard = distributed.on_main_process(tensorboard_callback, run_dir)  # one events file, from rank 0
    trainer = CaptionTrainer(
        model=model,
        args=args,
        train_dataset=CaptionDataset(splits.train_dir, splits.train),
        eval_dataset=CaptionDataset(splits.val_dir, splits.val) if splits.val else None,
        data_collator=CaptionCollator(processor, config.max_length),
        callbacks=[c for c in (tensorboard, timer) if c is not None],
        caption_scorer=scorer if config.metric_for_best_model != "loss" else None,
    )
    return trainer, timer


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


def training_metrics(result, timer: StepTimer, seconds: float, config: Config, device: str) -> dict:
    images_per_step = effective_batch_size(config)  # all processes: the step time is the slowest rank's
    per_step = timer.seconds / timer.steps if timer.steps else None
    return {
        "train_loss": result.training_loss,
        "global_step": result.global_step,
        "train_seconds": seconds,
        "seconds_per_step": per_step,
        "train_images_per_second": images_per_step / per_step if per_step else None,
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
