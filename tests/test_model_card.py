"""Model cards: the front matter parses (yaml.safe_load), names the hub base and dataset (never a local path),
carries the run's metrics and pipeline_tag; the cards of a real run's final_model and merged_model."""

import json
import shutil

import yaml

from git_qlora_main import main
from utils.model_card import build_model_card, hub_id

AFTER = {"bleu_4": 0.2512, "cider": 0.8134, "rouge_l": 0.5, "num_images": 8, "num_references": 24}
BEFORE = {"bleu_4": 0.1, "cider": 0.3, "rouge_l": 0.4, "num_images": 8, "num_references": 24}


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def settings(**changes) -> dict:
    base = {"run_name": "r1", "model_name": "microsoft/git-base", "quantization_bits": 4, "lora_r": 16, "lora_alpha": 32.0,
            "lora_dropout": 0.0, "lora_target_modules": ["query", "value"], "learning_rate": 2e-4, "warmup_ratio": 0.05,
            "max_length": 40, "num_train_examples": 100, "num_val_examples": 20, "effective_batch_size": 8,
            "world_size": 1, "precision": "4-bit nf4 base", "dataset": None, "train_split": "train", "num_beams": 1}
    return {**base, **changes}


def test_hub_base_and_dataset_are_named_in_the_metadata(tmp_path):
    card = build_model_card(settings(dataset="lambdalabs/pokemon-blip-captions"),
                            {"before": BEFORE, "after": AFTER, "global_step": 30}, str(tmp_path))
    meta, body = split_card(card)
    assert meta["base_model"] == "microsoft/git-base" and meta["datasets"] == ["lambdalabs/pokemon-blip-captions"]
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "image-to-text"
    assert {"git", "qlora", "lora", "image-captioning"} <= set(meta["tags"])
    scores = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert scores == {"bleu_4": 0.2512, "cider": 0.8134, "rouge_l": 0.5}
    assert "| CIDEr | 0.3000 | 0.8134 | +0.5134 |" in body
    assert f'PeftModel.from_pretrained(base, "{tmp_path}/final_model")' in body


def test_a_local_base_is_never_in_the_metadata(tmp_path):
    local = tmp_path / "my_base"
    local.mkdir()
    meta, body = split_card(build_model_card(settings(model_name=str(local)), None, "results/r1"))
    assert "base_model" not in meta and str(tmp_path) not in yaml.safe_dump(meta)
    assert "a local checkpoint (`my_base`, not on the hub)" in body and "No validation images" in body
    assert "model-index" not in meta and "datasets" not in meta
    assert hub_id("./folder") is None and hub_id("org/name") == "org/name" and hub_id("shards/*.tar") is None


def test_the_caption_tokenizer_protocol_is_named_when_present():
    metrics = {"before": BEFORE, "after": AFTER, "caption_tokenizer": "ptb"}
    assert "caption tokenizer ptb" in build_model_card(settings(), metrics, "r")
    assert "caption tokenizer" not in build_model_card(settings(), {"before": BEFORE, "after": AFTER}, "r")


def test_a_trained_runs_card_carries_its_metrics(trained_run):
    text = (trained_run / "final_model" / "README.md").read_text()
    meta, body = split_card(text)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert meta["pipeline_tag"] == "image-to-text" and meta["library_name"] == "peft"
    assert "base_model" not in meta  # the tiny test model is a local folder
    scores = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert scores["cider"] == round(metrics["after"]["cider"], 4)
    assert "More Information Needed" not in text and "text-generation" not in text
    assert f"Optimizer steps | {metrics['global_step']} |" in body and "r 8, alpha" in body and "report.html" in body


def test_the_merged_models_card(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("merged_model", "checkpoints"))
    assert main(["--merge_weights", "--output_dir", str(run)]) == 0
    meta, body = split_card((run / "merged_model" / "README.md").read_text())
    report = json.loads((run / "merge_report.json").read_text())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-to-text" and "merged" in meta["tags"]
    assert f'AutoModelForCausalLM.from_pretrained("{run}/merged_model")' in body and "PeftModel" not in body
    assert f"captions agree {100 * report['caption_agreement']:.0f}%" in body
    metrics = json.loads((run / "metrics.json").read_text())
    assert {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}["cider"] == round(metrics["after"]["cider"], 4)
