"""--early_stopping_patience: transformers' EarlyStoppingCallback, judging the full validation metrics (caption
metrics included), saying when and why it stopped, and keeping its count across --resume."""

import logging

from transformers import EarlyStoppingCallback

logger = logging.getLogger(__name__)


class CaptionEarlyStopping(EarlyStoppingCallback):
    """Stops training after `patience` validations in a row without the metric improving by more than `threshold`.

    The Trainer calls on_evaluate before CaptionTrainer.evaluate adds the caption metrics, so the judging happens
    in `judge`, called by CaptionTrainer.evaluate with every metric. All ranks get the same metrics (the validation
    loss is gathered, caption scores are broadcast), so all stop at the same step.
    """

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float = 0.0):
        super().__init__(early_stopping_patience, early_stopping_threshold)
        self.evaluations = 0
        self.stopped: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        # --resume: trainer_state.json holds this callback's state (stateful_callbacks); the count goes on from it,
        # under this session's patience (the Trainer's own restore would bring back the old patience too).
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and isinstance(saved, dict):
            attributes = saved.get("attributes", {})
            self.early_stopping_patience_counter = int(attributes.get("early_stopping_patience_counter", 0))
            self.evaluations = int(attributes.get("evaluations", 0))
            logger.info("Early stopping continues at %d of %d validations without improvement",
                        self.early_stopping_patience_counter, self.early_stopping_patience)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        pass  # the stock callback judges here, on metrics without the caption scores; judge() runs once they are in

    def judge(self, args, state, control, metrics: dict) -> None:
        name = args.metric_for_best_model
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            logger.warning("Early stopping found no %s among the validation metrics; it does not stop this time.", key)
            return
        self.evaluations += 1
        self.check_metric_value(args, state, control, metrics[key])
        logger.info("Validation %d (step %d): %s %.4g, best so far %s; %d of %d without improvement",
                    self.evaluations, state.global_step, name, metrics[key],
                    "none" if state.best_metric is None else f"{state.best_metric:.4g}",
                    self.early_stopping_patience_counter, self.early_stopping_patience)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True
            self.stopped = self._stop_record(args, state, name, metrics[key])
            logger.info("Early stopping: %s", self.stopped["reason"])

    def _stop_record(self, args, state, name: str, value: float) -> dict:
        best = state.best_metric
        direction = "higher" if args.greater_is_better else "lower"
        reason = (f"{name} did not improve ({direction} is better, by more than {self.early_stopping_threshold}) on "
                  f"{self.early_stopping_patience} validation(s) in a row; stopped at step {state.global_step} of {state.max_steps} "
                  f"(epoch {state.epoch:.2f}, validation {self.evaluations}); best {name} {best:.4g} at step "
                  f"{state.best_global_step}")
        return {"step": state.global_step, "epoch": state.epoch, "evaluation": self.evaluations, "metric": name,
                "value": value, "best_value": best, "best_step": state.best_global_step,
                "max_steps": state.max_steps, "reason": reason}

    def summary(self) -> dict:
        """For metrics.json: the settings, whether it stopped, and where and why."""
        out = {"patience": self.early_stopping_patience, "threshold": self.early_stopping_threshold,
               "evaluations": self.evaluations, "stopped_early": self.stopped is not None}
        if self.stopped is not None:
            out.update(self.stopped)
        else:
            out["validations_without_improvement"] = self.early_stopping_patience_counter
        return out

    def state(self) -> dict:
        saved = super().state()
        saved["attributes"]["evaluations"] = self.evaluations
        return saved
