"""--report_to: MLflow (an offline file store, read back with MLflow's own client), W&B offline when installed,
and a clear error naming the install command when a tracker's package is missing."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from git_qlora_main import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], **env) -> subprocess.CompletedProcess:
    """In a fresh process: MLflow and W&B keep global state (tracking URI, active run) per process."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", GOMP_SPINCOUNT="1000", CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.run([sys.executable, "git_qlora_main.py", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=300)


def test_mlflow_file_store_holds_the_runs_params_and_metrics(tmp_path, train_cmd, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny (requirements-dev.txt) is not installed")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.7+ opens a file: store only when told to
    store = f"file:{tmp_path / 'mlruns'}"
    result = run_cli(train_cmd(tmp_path, "ml", "--max_steps", "4", "--logging_steps", "1", "--report_to", "mlflow"),
                     MLFLOW_TRACKING_URI=store, MLFLOW_ALLOW_FILE_STORE="true")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ml"
    assert not (run_dir / "logs").exists()  # tensorboard was not asked for

    client = mlflow.MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "ml" and run.info.status == "FINISHED"
    settings = json.loads((run_dir / "run_config.json").read_text())
    params = run.data.params
    for key in ("lora_r", "learning_rate", "max_steps", "model_name", "precision"):
        assert params[f"run_config.{key}"] == str(settings[key])
    assert params["learning_rate"] == str(settings["learning_rate"])  # the Trainer's own TrainingArguments params
    metrics = json.loads((run_dir / "metrics.json").read_text())
    logged = run.data.metrics
    for key in ("cider", "bleu_4", "rouge_l"):
        assert logged[f"final.after.{key}"] == pytest.approx(metrics["after"][key])
        assert logged[f"final.before.{key}"] == pytest.approx(metrics["before"][key])
    assert logged["final.global_step"] == 4
    # The Trainer's MLflowCallback logged the training loss of every step into the same run.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"run_config.json", "metrics.json", "README.md"} <= artifacts


def test_missing_tracker_package_is_a_clean_error_before_anything_loads(tmp_path, train_cmd, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(train_cmd(tmp_path, "w", "--report_to", "tensorboard,wandb")) == 2
    err = capsys.readouterr().err
    assert "--report_to wandb needs the wandb package" in err and "pip install wandb" in err
    assert "Traceback" not in err and not (tmp_path / "w").exists()


@pytest.mark.parametrize("value, needle", [("comet", "--report_to takes tensorboard, mlflow, wandb or none"),
                                           ("none,mlflow", "cannot be combined")])
def test_bad_report_to_is_named(tmp_path, train_cmd, capsys, value, needle):
    assert main(train_cmd(tmp_path, "x", "--report_to", value)) == 2
    assert needle in capsys.readouterr().err


def test_wandb_offline_run_holds_the_settings_and_metrics(tmp_path, train_cmd):
    pytest.importorskip("wandb", reason="wandb is not installed (an optional extra: requirements-extras.txt)")
    result = run_cli(train_cmd(tmp_path, "wb", "--max_steps", "2", "--report_to", "wandb"), WANDB_MODE="offline",
                     WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "wb").rglob("offline-run-*")), "no offline W&B run was written"
