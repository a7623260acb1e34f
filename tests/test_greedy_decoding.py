"""Greedy captioning with a static key/value cache (models/greedy_decoding.py) against transformers' own generate."""

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from models import caption_speed
from models.greedy_decoding import can_decode_greedily, fast_decoding, greedy_caption_ids
from models.vision_cache import as_pixel_values, encode_images, vision_from_cache


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory):
    """A tiny random GIT whose captions depend on the image and end at different steps (weights std 0.5: at
    GitConfig's 0.02 every image gets the same caption, which would not show rows being kept apart)."""
    from dataclasses import replace

    from models.small_git import build_small_git
    from tests.conftest import TINY_SIZE
    from utils.demo_data import every_caption

    size = replace(TINY_SIZE, initializer_range=0.5, dropout=0.0)
    return build_small_git(tmp_path_factory.mktemp("varied_git"), every_caption(), size, seed=0)


def _model(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _pixels(model, count=5, seed=1):
    size = model.config.vision_config.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _generate(model, pixel_values, tokens):
    with torch.no_grad():
        return model.generate(pixel_values=pixel_values, max_new_tokens=tokens, do_sample=False)


def _rows_end_apart(model, pixel_values, tokens):
    """generate's ids, checked to be a fair test: distinct rows, one ended by EOS and padded, one still going."""
    ids = _generate(model, pixel_values, tokens)
    pad, eos = model.generation_config.pad_token_id, model.generation_config.eos_token_id
    assert len({tuple(row) for row in ids.tolist()}) == len(ids)
    assert (ids[:, -1] == pad).any() and ((ids == eos).sum(dim=1) == 0).any()
    return ids


def test_greedy_ids_equal_generate_with_rows_ending_at_different_steps(varied_model_dir):
    model = _model(varied_model_dir)
    pixels = _pixels(model)
    expected = _rows_end_apart(model, pixels, 8)
    assert can_decode_greedily(model, pixels, 1)
    assert torch.equal(greedy_caption_ids(model, pixels, 8), expected)
    assert torch.equal(greedy_caption_ids(model, pixels, 1), _generate(model, pixels, 1))


def test_greedy_ids_equal_generate_through_a_lora_adapter_and_on_cached_features(varied_model_dir):
    model = _model(varied_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()  # random B: the adapter changes the captions
    pixels = _pixels(model, 4, seed=2)
    assert not torch.equal(_generate(peft_model, pixels, 10), _generate(_model(varied_model_dir), pixels, 10))
    assert torch.equal(greedy_caption_ids(peft_model, pixels, 10), _generate(peft_model, pixels, 10))
    features = as_pixel_values(encode_images(peft_model, pixels, None))
    with vision_from_cache(peft_model):
        assert torch.equal(greedy_caption_ids(peft_model, features, 10), _generate(peft_model, features, 10))


def test_generation_settings_that_change_decoding_are_left_to_generate(varied_model_dir):
    model = _model(varied_model_dir)
    pixels = _pixels(model, 2)
    assert can_decode_greedily(model, pixels, 1)
    assert not can_decode_greedily(model, pixels, 3)  # beam search
    assert not can_decode_greedily(model, pixels[:, None], 1)  # video frames
    model.generation_config.repetition_penalty = 1.3
    assert not can_decode_greedily(model, pixels, 1)


def test_bf16_greedy_ids_equal_bf16_generate(varied_model_dir):
    model = _model(varied_model_dir, torch.bfloat16)
    pixels = _pixels(model, 4).to(torch.bfloat16)
    assert torch.equal(greedy_caption_ids(model, pixels, 10), _generate(model, pixels, 10))


def test_compiled_step_pads_the_short_batch_without_recompiling(varied_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(caption_speed, "COMPILE_BACKEND", "eager")  # dynamo's graph without inductor: seconds
    model = _model(varied_model_dir)
    pixels = _pixels(model, 7)
    expected = _rows_end_apart(model, pixels, 9)
    torch._dynamo.reset()
    done = caption_speed.speed_up_vision_tower(model, "on", "auto", "cpu", 7, 4, tokens=9)
    assert "compiled decoder, 9 tokens" in done
    with torch._dynamo.config.patch(error_on_recompile=True):  # batches of 4 then 3 (padded): one graph
        ids = [greedy_caption_ids(model, pixels[:4], 9), greedy_caption_ids(model, pixels[4:], 9)]
    fast = fast_decoding(model)
    for part in (fast.prefill, fast.step):
        assert part.compiled is not None and not part.first_call  # it ran compiled, no fallback
    width = max(part.shape[1] for part in ids)
    padded = [torch.nn.functional.pad(part, (0, width - part.shape[1])) for part in ids]
    assert torch.equal(torch.cat(padded)[:, :expected.shape[1]], expected)


def test_a_failing_step_compiler_falls_back_to_eager_with_one_warning(varied_model_dir, monkeypatch, tmp_path, caplog):
    calls = []

    def broken_backend(graph, example_inputs):
        calls.append(1)
        if len(calls) > 1:  # the vision tower's graph compiles (it is the first), the decoder's parts do not
            raise RuntimeError("no compiler for this graph")
        return graph.forward

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(caption_speed, "COMPILE_BACKEND", broken_backend)
    model = _model(varied_model_dir)
    pixels = _pixels(model, 4)
    expected = _generate(model, pixels, 8)
    torch._dynamo.reset()
    caption_speed.speed_up_vision_tower(model, "on", "auto", "cpu", 4, 4, tokens=8)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(greedy_caption_ids(model, pixels, 8), expected)
        assert torch.equal(greedy_caption_ids(model, pixels, 8), expected)
    warnings = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 2 and all("no compiler" in text for text in warnings)  # one for each part, once
    assert "Compiling the decoder's prefill failed" in warnings[0] and "Compiling the decoder's step failed" in warnings[1]


@pytest.mark.slow
def test_inductor_compiled_step_gives_generates_ids(varied_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = _model(varied_model_dir)
    pixels = _pixels(model, 4)
    expected = _generate(model, pixels, 8)
    torch._dynamo.reset()
    caption_speed.speed_up_vision_tower(model, "on", "auto", "cpu", 4, 4, tokens=8)
    assert torch.equal(greedy_caption_ids(model, pixels, 8), expected)
    assert fast_decoding(model).prefill.compiled is not None and fast_decoding(model).step.compiled is not None


def test_inference_compile_on_folds_the_adapter_and_keeps_the_captions(trained_run, data_dir, tmp_path, monkeypatch, caplog):
    from git_qlora_main import main

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(caption_speed, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(caption_speed, "int8_pays_under_auto", lambda device: False)  # the same tower on every host
    caplog.set_level(logging.INFO)
    common = ["--inference", "--test_dir", str(data_dir / "test"), "--output_dir", str(trained_run), "--num_workers", "0",
              "--max_new_tokens", "8", "--batch_size", "3"]
    assert main(common + ["--compile", "off", "--predictions_file", str(tmp_path / "eager.csv")]) == 0
    torch._dynamo.reset()
    assert main(common + ["--compile", "on", "--predictions_file", str(tmp_path / "compiled.csv")]) == 0
    assert "compiled decoder, 8 tokens (adapter folded into the weights)" in caplog.text and "failed" not in caplog.text
    read = lambda path: path.read_text(encoding="utf-8").splitlines()  # noqa: E731
    eager, compiled = read(tmp_path / "eager.csv"), read(tmp_path / "compiled.csv")
    # The adapter folded into the bf16 base rounds differently from adding its products: nearly all the same.
    assert len(eager) == 9 and sum(a == b for a, b in zip(eager, compiled)) >= 8


def test_lora_over_dequantized_4bit_layers_folds_to_the_adapters_own_outputs(tiny_model_dir):
    """A 4-bit base with LoRA (as --inference loads a run where bf16 is not native), its 4-bit layers made plain:
    PEFT's 4-bit merge cannot fold those, fold_lora_layers does, and the folded model gives the logits the
    adapter's own products gave (fp32: equal to rounding)."""
    from models.git_qlora import load_base_model
    from utils.config import Config

    base = load_base_model(Config(mode="inference", model_name=str(tiny_model_dir), bnb_4bit_compute_dtype="float32"), "cpu")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)).eval()
    caption_speed.dequantize_4bit_layers(model, torch.float32)
    pixels, ids = _pixels(model, 3), torch.tensor([[1, 5, 6, 7]] * 3)
    with torch.no_grad():
        expected = model(pixel_values=pixels, input_ids=ids).logits
        assert caption_speed.fold_lora_layers(model) == []
        layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
        assert layers and all(m.merged for m in layers)
        for layer in layers:  # the sum now lives in the plain weights: LoRA's own matrices no longer count
            for lora_b in layer.lora_B.values():
                lora_b.weight.zero_()
        folded = model(pixel_values=pixels, input_ids=ids).logits
    assert torch.allclose(folded, expected, atol=1e-4, rtol=1e-4)
