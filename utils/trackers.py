"""--report_to mlflow / wandb: one tracker run per training session, opened before the Trainer so its own
integration (MLflowCallback, WandbCallback) logs into it, then given the run's settings and final metrics."""

import json
import logging
import os
from pathlib import Path

from utils.errors import UserInputError

logger = logging.getLogger(__name__)

PARAM_PREFIX = "run_config."  # the Trainer logs TrainingArguments under the same names (learning_rate, seed...)


def flat_numbers(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics as {"after.cider": 0.41, ...}; texts and lists are left out."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):  # NaN, inf: no value
            out[name] = float(value)
    return out


def _param_text(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


class TrackerRuns:
    """The tracker runs of one training session (main process only); each method is a no-op for trackers not chosen."""

    def __init__(self, report_to: tuple[str, ...]):
        self.names = [n for n in report_to if n in ("mlflow", "wandb")]
        self.mlflow = self.wandb = None

    def start(self, run_name: str, run_dir: Path, settings: dict) -> None:
        """Open the runs (named as the run folder) and log the run's settings (run_config.json) as parameters."""
        self.run_name, self.run_dir = run_name, Path(run_dir)
        if "mlflow" in self.names:
            import mlflow

            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

            if mlflow.active_run() is None:  # else a caller's own run: log into it
                self._start_mlflow(mlflow)
            self.mlflow = mlflow
            params = {PARAM_PREFIX + k: _param_text(v) for k, v in settings.items() if len(_param_text(v)) <= MAX_PARAM_VAL_LENGTH}
            items = list(params.items())
            for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                mlflow.log_params(dict(items[start : start + MAX_PARAMS_TAGS_PER_BATCH]))
            mlflow.set_tags({"git_qlora.run_dir": str(self.run_dir.resolve()), "git_qlora.run_name": self.run_name})
            logger.info("MLflow run %s (tracking URI %s)", mlflow.active_run().info.run_id, mlflow.get_tracking_uri())
        if "wandb" in self.names:
            import wandb

            if wandb.run is None:
                wandb.init(project=os.environ.get("WANDB_PROJECT", "git-qlora"), name=self.run_name,
                           dir=str(self.run_dir), config={"run_config": settings})
            else:
                wandb.config.update({"run_config": settings}, allow_val_change=True)
            self.wandb = wandb

    def _start_mlflow(self, mlflow) -> None:
        try:
            mlflow.start_run(run_name=self.run_name)
        except Exception as error:  # noqa: BLE001 - a store it cannot open, a server it cannot reach: the user's setup
            first = str(error).split(". ")[0]
            raise UserInputError(
                f"--report_to mlflow could not start a run at tracking URI {mlflow.get_tracking_uri()}: {first}. "
                "Check MLFLOW_TRACKING_URI (a server, sqlite:///mlflow.db with `pip install mlflow`, or file:DIR with "
                "MLFLOW_ALLOW_FILE_STORE=true), or leave mlflow out of --report_to."
            ) from None

    def log_final(self, metrics: dict, files: list[Path]) -> None:
        """The final metrics (before/after caption scores, early stopping, speed) and the run's record files."""
        numbers = flat_numbers({k: v for k, v in metrics.items() if k != "sample_captions"})
        if self.mlflow is not None and self.mlflow.active_run() is not None:
            self.mlflow.log_metrics({f"final.{k}": v for k, v in numbers.items()})
            for path in files:
                if Path(path).is_file():
                    self.mlflow.log_artifact(str(path))
        if self.wandb is not None and self.wandb.run is not None:
            self.wandb.run.summary.update({f"final.{k}": v for k, v in numbers.items()})

    def end(self, failed: bool = False) -> None:
        if self.mlflow is not None and self.mlflow.active_run() is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
        if self.wandb is not None and self.wandb.run is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
        self.mlflow = self.wandb = None
