"""The Hugging Face Trainer as --train runs it: a subclass whose loss reads only the caption positions and whose
evaluations also score captions, the callbacks around it, and its TrainingArguments from the Config."""

import logging
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback

from models.training_speed import last_layer_over_caption_rows
from scripts.early_stopping import CaptionEarlyStopping
from scripts.validation import CaptionScorer
from utils import distributed
from utils.config import Config
from utils.errors import UserInputError
from utils.io import give_default_permissions
from utils.workers import guard_workers

logger = logging.getLogger(__name__)


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


def final_model_step(state) -> int:
    """The step whose weights the Trainer leaves in the model: the best checkpoint's, which it loads at the end."""
    suffix = Path(state.best_model_checkpoint or "").name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else state.global_step


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
        disable_tqdm=not sys.stderr.isatty(),  # in a log file, LogToLogging's step lines say how far it got
        bf16=autocast == "bf16",
        fp16=autocast == "fp16",  # autocast plus the Trainer's loss scaling
        # Several processes: DDP over the LoRA weights, every one of which gets a gradient each step.
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if device == "cpu" and distributed.is_distributed() else None,
    )


def tensorboard_callback(run_dir: Path) -> TensorBoardCallback:
    (run_dir / "logs").mkdir(exist_ok=True)
    tensorboard = TensorBoardCallback(tb_writer=SummaryWriter(str(run_dir / "logs")))
    tensorboard.logging_dir = str(run_dir / "logs")  # where it reopens its writer after training ends
    return tensorboard


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
