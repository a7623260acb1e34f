"""`--inference` (folder and single image) and `--merge_weights` on a tiny trained run."""

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from git_qlora_main import main
from models.git_qlora import load_adapter_model
from scripts.inference import caption_folder, generate_captions
from utils.config import Config, apply_run_settings, load_run_config
from utils.dataset_utils import find_images, load_image


def _read_csv(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:2] == ["image_name", "caption"]
    return {row[0]: row[1] for row in rows[1:]}


def test_folder_and_single_image_give_the_same_caption(trained_run, data_dir, tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    test_dir = tmp_path / "images"
    shutil.copytree(data_dir / "test", test_dir)
    (test_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out_csv = tmp_path / "preds.csv"
    args = ["--inference", "--test_dir", str(test_dir), "--output_dir", str(trained_run), "--num_workers", "0",
            "--max_new_tokens", "8", "--predictions_file", str(out_csv)]
    assert main(args) == 0
    assert "broken.png" in caplog.text and "Captioned 8 images (1 skipped)" in caplog.text
    capsys.readouterr()
    captions = _read_csv(out_csv)
    assert list(captions) == sorted(find_images(data_dir / "test"))
    assert all(captions.values())

    name = "img_00003.png"
    assert main(["--inference", "--test_image", str(test_dir / name), "--output_dir", str(trained_run),
                 "--max_new_tokens", "8"]) == 0
    assert capsys.readouterr().out == captions[name] + "\n"


def test_default_predictions_path_is_in_the_run(trained_run, data_dir):
    assert main(["--inference", "--test_dir", str(data_dir / "test"), "--output_dir", str(trained_run),
                 "--num_workers", "0", "--max_new_tokens", "4"]) == 0
    assert len(_read_csv(trained_run / "captions.csv")) == 8


def test_batched_captions_equal_one_at_a_time(trained_run, data_dir):
    config = apply_run_settings(Config(mode="inference"), load_run_config(trained_run))
    model = load_adapter_model(config, trained_run / "final_model", "cpu")
    processor = AutoProcessor.from_pretrained(trained_run / "final_model")
    names = find_images(data_dir / "test")
    batched = caption_folder(model, processor, data_dir / "test", names, batch_size=8, max_new_tokens=10, progress=False)
    single = caption_folder(model, processor, data_dir / "test", names, batch_size=1, max_new_tokens=10, progress=False)
    assert batched.captions == single.captions


def test_folder_of_runs_is_a_clean_error(trained_run, capsys):
    runs = trained_run.parent
    (runs / "r0").mkdir(exist_ok=True)
    assert main(["--inference", "--test_image", "x.png", "--output_dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "folder of runs" in err and str(trained_run) in err and "Traceback" not in err


def test_missing_adapter_and_merged_model_name_the_command(tmp_path, trained_run, capsys):
    run = tmp_path / "half"
    run.mkdir()
    shutil.copy(trained_run / "run_config.json", run)
    assert main(["--merge_weights", "--output_dir", str(run)]) == 2
    assert "--train" in capsys.readouterr().err
    assert main(["--inference", "--test_image", "x.png", "--output_dir", str(run), "--use_merged"]) == 2
    assert "--merge_weights" in capsys.readouterr().err


def _merge(run: Path, *extra: str) -> dict:
    assert main(["--merge_weights", "--output_dir", str(run), *extra]) == 0
    return json.loads((run / "merge_report.json").read_text())


@pytest.fixture(scope="module")
def merged_run(trained_run) -> Path:
    _merge(trained_run)
    return trained_run


def test_merged_model_runs_with_plain_transformers(merged_run, data_dir):
    folder = merged_run / "merged_model"
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    # The GIT model card's own code, with neither PEFT nor bitsandbytes.
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in n for n, _ in model.named_parameters())
    image, _ = load_image(data_dir / "test" / "img_00000.png")
    pixel_values = processor(images=image, return_tensors="pt").pixel_values
    ids = model.generate(pixel_values=pixel_values, max_new_tokens=10)
    caption = processor.batch_decode(ids, skip_special_tokens=True)[0]
    config = apply_run_settings(Config(mode="inference"), load_run_config(merged_run))
    adapter = load_adapter_model(config.replace(bnb_4bit_compute_dtype="float32"), merged_run / "final_model", "cpu")
    assert caption.strip() == generate_captions(adapter, processor, [image], max_new_tokens=10)[0]


def test_merged_model_files_have_the_permissions_of_the_rest_of_the_run(merged_run):
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (merged_run / "merged_model").iterdir()}
    assert "model.safetensors" in modes  # safetensors writes it 0600 through a temporary file
    assert set(modes.values()) == {0o666 & ~umask} == {(merged_run / "run_config.json").stat().st_mode & 0o777}, modes


def test_merged_captions_agree_with_the_adapter(merged_run, data_dir):
    report = json.loads((merged_run / "merge_report.json").read_text())
    assert report["images"] == 8 and report["caption_agreement"] >= 0.9
    # Independent check, not the report's own numbers: caption the test images with both models.
    config = apply_run_settings(Config(mode="inference"), load_run_config(merged_run))
    adapter = load_adapter_model(config.replace(bnb_4bit_compute_dtype="float32"), merged_run / "final_model", "cpu")
    merged = AutoModelForCausalLM.from_pretrained(merged_run / "merged_model").eval()
    processor = AutoProcessor.from_pretrained(merged_run / "merged_model")
    images = [load_image(p)[0] for p in sorted((data_dir / "test").glob("*.png"))]
    a = generate_captions(adapter, processor, images, max_new_tokens=10)
    b = generate_captions(merged, processor, images, max_new_tokens=10)
    assert sum(x == y for x, y in zip(a, b)) / len(a) >= 0.9
    base = AutoModelForCausalLM.from_pretrained(load_run_config(merged_run)["base_model"]).eval()
    assert generate_captions(base, processor, images, max_new_tokens=10) != a  # the adapter matters


def test_dequantized_merge_is_closer_than_original(merged_run):
    dequantized = json.loads((merged_run / "merge_report.json").read_text())
    original = _merge(merged_run, "--merge_base", "original")
    assert dequantized["max_abs_logit_diff"] < original["max_abs_logit_diff"]
    _merge(merged_run)  # merging again replaces the folder cleanly
    assert not list(merged_run.glob(".merged_model*"))


def test_use_merged_captions_like_the_adapter(merged_run, data_dir, capsys):
    image = str(data_dir / "test" / "img_00001.png")
    exact = ["--bnb_4bit_compute_dtype", "float32"]  # the exact path: no bf16 rounding in either model
    assert main(["--inference", "--test_image", image, "--output_dir", str(merged_run), "--max_new_tokens", "8", *exact]) == 0
    adapter_caption = capsys.readouterr().out
    assert main(["--inference", "--test_image", image, "--output_dir", str(merged_run), "--max_new_tokens", "8", "--use_merged", *exact]) == 0
    assert capsys.readouterr().out == adapter_caption


def test_interrupted_merge_keeps_the_old_merged_model(merged_run, monkeypatch):
    before = (merged_run / "merged_model" / "model.safetensors").read_bytes()

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.nn.Module, "save_pretrained", crash, raising=False)
    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", crash)
    assert main(["--merge_weights", "--output_dir", str(merged_run)]) == 130
    assert (merged_run / "merged_model" / "model.safetensors").read_bytes() == before
