"""--early_stopping_patience: a run that stops improving stops (one process and two), says where and why, and its
count survives --resume."""

import json
from pathlib import Path

from git_qlora_main import main
from tests.test_distributed import launch

# A learning rate this small leaves the validation loss flat: it never improves by the threshold, so the
# run must stop `patience` validations after the first (which sets the best).
FLAT = ["--learning_rate", "1e-9", "--eval_steps", "2", "--metric_for_best_model", "loss",
        "--early_stopping_threshold", "0.01"]


def check_stopped(run: Path, patience: int, expected_step: int) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    early = metrics["early_stopping"]
    assert early["stopped_early"] and early["patience"] == patience
    assert metrics["global_step"] == early["step"] == expected_step < early["max_steps"]
    assert early["metric"] == "loss" and early["evaluation"] == patience + 1 and early["best_step"] == 2
    assert "did not improve" in early["reason"] and f"step {expected_step}" in early["reason"]
    return early


def test_a_flat_run_stops_after_patience_validations(tmp_path, train_cmd):
    assert main(train_cmd(tmp_path, "es", "--max_steps", "40", "--early_stopping_patience", "2", *FLAT)) == 0
    early = check_stopped(tmp_path / "es", patience=2, expected_step=6)
    # Against the Trainer's own record: no validation after the first beat it by the threshold.
    first = early["best_value"]
    state = json.loads(sorted((tmp_path / "es" / "checkpoints").glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    losses = [r["eval_loss"] for r in state["log_history"] if "eval_loss" in r]
    assert len(losses) == 3 and all(first - loss <= 0.01 for loss in losses[1:])
    assert state["stateful_callbacks"]["CaptionEarlyStopping"]["attributes"]["early_stopping_patience_counter"] == 2
    card = (tmp_path / "es" / "final_model" / "README.md").read_text()
    assert "Early stopping" in card and "stopped at step 6" in card


def test_patience_zero_trains_every_step(tmp_path, train_cmd):
    assert main(train_cmd(tmp_path, "all", "--max_steps", "6", *FLAT)) == 0
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and "early_stopping" not in metrics


def test_the_count_survives_resume(tmp_path, train_cmd):
    # Session 1: validations at 2 (best) and 4 (one without improvement), then max_steps ends it.
    assert main(train_cmd(tmp_path, "rs", "--max_steps", "4", "--early_stopping_patience", "3", *FLAT)) == 0
    assert "stopped_early" in json.loads((tmp_path / "rs" / "metrics.json").read_text())["early_stopping"]
    # Session 2 goes on counting from 1: validations at 6 (2) and 8 (3) -> stop at 8, not at 10 as a fresh count would.
    assert main(train_cmd(tmp_path, "rs", "--max_steps", "40", "--early_stopping_patience", "3", *FLAT, "--resume")) == 0
    check_stopped(tmp_path / "rs", patience=3, expected_step=8)


def test_two_processes_stop_at_the_same_step(tmp_path, train_cmd):
    """Both ranks must leave the training loop together: a rank that went on would wait forever in the next
    collective (the launch's timeout fails the test)."""
    result = launch(train_cmd(tmp_path, "es2", "--max_steps", "40", "--early_stopping_patience", "2", *FLAT), nproc=2)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Early stopping: loss did not improve" in result.stdout
    check_stopped(tmp_path / "es2", patience=2, expected_step=6)
