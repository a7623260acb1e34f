"""The frozen-vision feature cache: same loss and gradients as decoding images, the plain-PEFT adapter, the rules."""

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoProcessor

from git_qlora_main import main
from models.git_qlora import load_base_model, prepare_for_training
from models.vision_cache import encode_images, feature_shape, plan_feature_cache, vision_from_cache
from utils.config import Config
from utils.dataset_utils import (
    CachedFeatureDataset, CaptionCollator, CaptionDataset, FeatureCaptionCollator, collect_examples,
)
from utils.errors import UserInputError
from utils.feature_store import FeatureStore


def _model(tiny_model_dir, compute="float32"):
    config = Config(mode="train", model_name=str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0,
                    bnb_4bit_compute_dtype=compute)
    torch.manual_seed(0)
    model = prepare_for_training(load_base_model(config, "cpu"), config)
    for name, p in model.named_parameters():  # non-zero B, so every LoRA weight gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def _loss_and_grads(model, batch):
    torch.manual_seed(0)  # the decoder's dropout draws the same masks in both runs
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _store(tmp_path, model, processor, data_dir, examples, dtype):
    names = sorted({e.image_name for e in examples})
    store = FeatureStore(tmp_path / f"cache-{dtype}", ["train/" + n for n in names], feature_shape(model), dtype, "test")
    images = [CaptionDataset(data_dir / "train", examples)._load(n) for n in names]
    store.write(["train/" + n for n in names], encode_images(model, processor(images=images, return_tensors="pt").pixel_values, None))
    return store


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cached_features_give_the_same_loss_and_gradients(tiny_model_dir, data_dir, tmp_path, dtype, tolerance):
    """fp32 rows: equal up to float rounding (1e-5). bf16 rows, the default storage on bf16 hardware: the
    8-bit mantissa of the stored features moves loss and gradients by at most 2% here."""
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    examples = collect_examples(data_dir / "train", data_dir / "captions.csv")[:6]
    model = _model(tiny_model_dir)
    images = CaptionDataset(data_dir / "train", examples)
    loss, grads = _loss_and_grads(model, CaptionCollator(processor, 40)([images[i] for i in range(len(examples))]))

    cached = CachedFeatureDataset(_store(tmp_path, model, processor, data_dir, examples, dtype), "train/", examples)
    batch = FeatureCaptionCollator(processor.tokenizer, 40)([cached[i] for i in range(len(cached))])
    assert batch["pixel_values"].shape[1] == 1  # features, not pixels
    with vision_from_cache(model):
        cached_loss, cached_grads = _loss_and_grads(model, batch)
    assert cached_loss == pytest.approx(loss, rel=tolerance)
    assert grads.keys() == cached_grads.keys() and len(grads) == 2 * 2 * 6
    for name, grad in grads.items():
        scale = grad.abs().max().item()
        assert scale > 0 and (cached_grads[name] - grad).abs().max().item() <= tolerance * scale, name


def test_vision_from_cache_still_captions_real_images_and_restores_the_encoder(tiny_model_dir, data_dir):
    from scripts.inference import generate_captions
    from utils.dataset_utils import load_image

    model = _model(tiny_model_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    image = load_image(data_dir / "test" / "img_00000.png")[0]
    encoder = model.base_model.model.git.image_encoder
    plain = generate_captions(model, processor, [image], max_new_tokens=6)
    with vision_from_cache(model):
        assert generate_captions(model, processor, [image], max_new_tokens=6) == plain
    assert model.base_model.model.git.image_encoder is encoder


def _plan(setting="auto", layers=("git.encoder.layer.0.attention.self.query",), images=100, passes=3.0, folder=None):
    return plan_feature_cache(setting, list(layers), images, passes, (197, 768), torch.bfloat16, folder)


def test_cache_rules(tmp_path):
    assert _plan(folder=tmp_path).use  # frozen vision, seen 3 times: auto turns it on
    assert _plan(folder=tmp_path).nbytes == 100 * 197 * 768 * 2
    assert not _plan("off", folder=tmp_path).use
    assert "seen 0.50 times" in _plan(passes=0.5, folder=tmp_path).reason
    assert _plan("on", passes=0.5, folder=tmp_path).use  # on means on
    vision = ("git.image_encoder.vision_model.encoder.layers.0.self_attn.q_proj",)
    assert not _plan(layers=vision, folder=tmp_path).use and "vision tower" in _plan(layers=vision, folder=tmp_path).reason
    with pytest.raises(UserInputError, match="--cache_image_features on.*--lora_target_modules"):
        _plan("on", layers=vision, folder=tmp_path)
    huge = 10**9  # a billion images: more than any disk here holds
    assert "free disk space" in _plan(images=huge, folder=tmp_path).reason
    with pytest.raises(UserInputError, match="does not fit"):
        _plan("on", images=huge, folder=tmp_path)


def test_cache_on_with_vision_targets_is_a_clean_error(tmp_path, train_cmd, capsys):
    args = train_cmd(tmp_path, "r", "--max_steps", "1", "--cache_image_features", "on", "--lora_target_modules", "query,fc1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--cache_image_features on" in err and "--lora_target_modules" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "final_model").exists()


def _train(train_cmd, out, run, cache, *extra, lr="2e-2"):
    assert main(train_cmd(out, run, "--cache_image_features", cache, "--lora_r", "8", "--learning_rate", lr,
                          "--bnb_4bit_compute_dtype", "float32", *extra)) == 0
    return out / run


def test_cached_training_matches_uncached_and_saves_a_plain_peft_adapter(tmp_path, train_cmd, tiny_model_dir, caplog):
    caplog.set_level("INFO")
    on = _train(train_cmd, tmp_path, "on", "on", "--max_steps", "6", "--logging_steps", "1", lr="1e-3")
    assert "Image feature cache on" in caplog.text
    off = _train(train_cmd, tmp_path, "off", "off", "--max_steps", "6", "--logging_steps", "1", lr="1e-3")
    assert not (on / "feature_cache").exists()  # removed after training
    a, b = load_file(on / "final_model" / "adapter_model.safetensors"), load_file(off / "final_model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all("image_encoder" not in k for k in a)
    # The same examples in the same order with the same dropout masks: every step's loss agrees to 0.1%.
    # (The adapters are not compared element by element: Adam turns the rounding noise of near-zero
    # gradients into full-size steps of either sign.)
    losses = [[e["loss"] for e in json.loads((r / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
               if "loss" in e] for r in (on, off)]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], rel=1e-3)
    metrics_on, metrics_off = (json.loads((r / "metrics.json").read_text()) for r in (on, off))
    assert metrics_on["feature_cache_seconds"] > 0 and metrics_off["feature_cache_seconds"] == 0
    assert metrics_on["seconds_per_step"] * 6 == pytest.approx(metrics_on["train_seconds"])
    # Loads in plain PEFT on the plain model, no missing or unexpected keys.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(on / "final_model"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(a)


def test_cache_with_resume_and_best_model_by_cider(tmp_path, train_cmd):
    run = _train(train_cmd, tmp_path, "r", "on", "--max_steps", "4", "--eval_steps", "2", "--save_total_limit", "3",
                 "--metric_for_best_model", "cider")
    state = json.loads((run / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_cider" in e] == [2, 4]
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "final_model")
    _train(train_cmd, tmp_path, "r", "on", "--max_steps", "6", "--eval_steps", "2", "--save_total_limit", "3",
           "--metric_for_best_model", "cider", "--resume")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and (run / "final_model" / "adapter_model.safetensors").is_file()
    state = json.loads((run / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_cider" in e] == [2, 4, 6]
    assert state["best_metric"] == max(e["eval_cider"] for e in state["log_history"] if "eval_cider" in e)
