"""The 4-bit QLoRA model builder and `--train`: run folder, adapter, TensorBoard, resume, errors."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoProcessor, TrainingArguments

from git_qlora_main import main
from models.git_qlora import (
    describe_precision, find_target_modules, load_base_model, prepare_for_training, resolve_base_dtype,
    resolve_compute_dtype, training_autocast,
)
from scripts.inference import generate_captions
from utils.config import Config, apply_run_settings
from utils.dataset_utils import CaptionCollator, CaptionDataset, collect_examples
from utils.errors import UserInputError


def _config(model_dir, **changes) -> Config:
    return Config(mode="train", model_name=str(model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0, **changes)


def _batch(data_dir, processor, n=4):
    examples = collect_examples(data_dir / "train", data_dir / "captions.csv")[:n]
    dataset = CaptionDataset(data_dir / "train", examples)
    return CaptionCollator(processor, 40)([dataset[i] for i in range(len(examples))])


def _train_steps(model, batch, steps=3, lr=1e-2) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_lora_targets_resolve_to_linear_layers_only(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    text = find_target_modules(model, ("query", "key", "value", "dense"))
    assert len(text) == 2 * 6 and all(name.startswith("git.encoder.layer.") for name in text)
    # A bare "output" also names BertSelfOutput modules; only the LM head is a Linear.
    assert find_target_modules(model, ("output",)) == ["output"]
    with pytest.raises(UserInputError, match="--lora_target_modules names qkv.*Valid names.*q_proj"):
        find_target_modules(model, ("query", "qkv"))


# Every name the README documents, alone and together.
DOCUMENTED_TARGETS = ["query", "key", "value", "dense", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "output"]


@pytest.mark.parametrize("names", [[n] for n in DOCUMENTED_TARGETS] + [DOCUMENTED_TARGETS, ["query", "key", "value", "dense", "output"]])
def test_peft_wraps_exactly_the_resolved_layers(tiny_model_dir, names):
    config = _config(tiny_model_dir, lora_target_modules=tuple(names))
    base = load_base_model(config, "cpu")
    resolved = find_target_modules(base, tuple(names))
    model = prepare_for_training(base, config)
    wrapped = {name.removeprefix("base_model.model.") for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert wrapped == set(resolved)
    assert all(isinstance(model.get_submodule("base_model.model." + name).base_layer, torch.nn.Linear) for name in wrapped)


def test_training_with_the_lm_head_target_works(tmp_path, train_cmd, tiny_model_dir):
    args = train_cmd(tmp_path, "head", "--max_steps", "2", "--lora_target_modules", "query,key,value,dense,output", "--split_ratio", "0")
    args[args.index("--test_dir"):args.index("--test_dir") + 2] = []
    assert main(args) == 0
    adapter = json.loads((tmp_path / "head" / "final_model" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "head" / "final_model"))
    assert isinstance(loaded.base_model.model.output, LoraLayer) and "output" in adapter["target_modules"]


def test_4bit_model_is_quantized_and_lora_wraps_targets(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_base_model(_config(tiny_model_dir), "cpu")
    assert isinstance(model.git.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    model = prepare_for_training(model, _config(tiny_model_dir, lora_target_modules=("query", "fc1")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len([n for n in trainable if n.endswith("lora_A.default.weight")]) == 2 + 2  # 2 query + 2 fc1


def _has_avx512_bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


@pytest.mark.skipif(not _has_avx512_bf16(), reason="bitsandbytes repacks 4-bit weights for inference only on CPUs "
                    "with AVX-512 BF16; this CPU has none, so the trap this test guards against cannot occur")
def test_4bit_cpu_training_survives_generation_between_steps(tiny_model_dir, data_dir):
    """Train, caption (eval mode, no grad), train again, twice: the CPU packing trap of GIT_NOTES."""
    import bitsandbytes as bnb

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    # The trap is real here: a plain 4-bit model repacks its weights when it generates.
    plain = load_base_model(_config(tiny_model_dir), "cpu").eval()
    image = CaptionDataset(data_dir / "test", collect_examples(data_dir / "test", data_dir / "captions.csv"))[0]["image"]
    generate_captions(plain, processor, [image], max_new_tokens=3)
    layers = [m for m in plain.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model = prepare_for_training(load_base_model(_config(tiny_model_dir), "cpu"), _config(tiny_model_dir))
    batch = _batch(data_dir, processor)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = []
    for _ in range(2):
        losses += _train_steps(model, batch)
        model.eval()
        images = [CaptionDataset(data_dir / "test", collect_examples(data_dir / "test", data_dir / "captions.csv"))[0]["image"]]
        assert isinstance(generate_captions(model, processor, images, max_new_tokens=5)[0], str)
    losses += _train_steps(model, batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # a high learning rate on one batch must fit it
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_gradient_checkpointing_recomputes_layers_with_same_loss_and_gradients(tiny_model_dir, data_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    batch = _batch(data_dir, processor)
    grads, forward_calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = _config(tiny_model_dir, gradient_checkpointing=checkpointing)
        model = prepare_for_training(load_base_model(config, "cpu"), config)
        for name, p in model.named_parameters():  # make B non-zero so A gets gradients too
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        calls = []
        # A module inside the layer: transformers checkpoints `forward`, so hooks on the layer itself run once.
        inner = model.base_model.model.git.encoder.layer[0].intermediate
        inner.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
        model.train()
        loss = model(**batch).loss
        in_forward = len(calls)
        loss.backward()
        forward_calls.append((in_forward, len(calls)))
        name = "base_model.model.git.encoder.layer.0.attention.self.query.lora_A.default.weight"
        grads.append((loss.item(), dict(model.named_parameters())[name].grad.clone()))
    # Checkpointing runs the decoder layer's insides again during backward; without it, once.
    assert forward_calls == [(1, 1), (1, 2)]
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6) and grads[1][1].abs().sum() > 0


def _scalar_tags(log_dir: Path) -> dict[str, int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, int] = {}
    for events in log_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags[tag] = tags.get(tag, 0) + len(acc.Scalars(tag))
    return tags


def test_train_writes_run_folder_and_adapter_loads_with_plain_peft(tmp_path, train_cmd, tiny_model_dir, data_dir):
    args = train_cmd(tmp_path, "r1", "--epochs", "2", "--quantization_bits", "4", "--lora_r", "8",
                     "--learning_rate", "5e-3", "--logging_steps", "2")
    assert main(args) == 0
    run = tmp_path / "r1"
    for name in ("run_config.json", "metrics.json", "final_model/adapter_config.json",
                 "final_model/adapter_model.safetensors", "final_model/processor_config.json"):
        assert (run / name).is_file(), name
    assert not list(run.rglob("*.bin")) or all(p.name == "training_args.bin" for p in run.rglob("*.bin"))
    settings = json.loads((run / "run_config.json").read_text())
    assert settings["base_model"] == str(tiny_model_dir) and settings["lora_r"] == 8
    # The checkpoint is self-contained: it carries the run's settings.
    assert json.loads((run / "final_model" / "run_config.json").read_text()) == settings
    # bf16 compute and autocast on CPUs with AVX-512 BF16 (this project's machines), fp32 elsewhere.
    assert settings["training_autocast"] == ("bf16" if settings["compute_dtype"] == "bfloat16" else None)
    assert settings["library_versions"]["transformers"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 2 * 72 // 4 and metrics["seconds_per_step"] > 0 and metrics["peak_memory_mb"] > 0
    assert {"before", "after", "val_loss", "train_loss"} <= metrics.keys()
    assert len(list((run / "checkpoints").glob("checkpoint-*"))) >= 1
    tags = _scalar_tags(run / "logs")
    assert tags.get("train/loss", 0) >= 3 and "eval/loss" in tags and "train/learning_rate" in tags

    # The adapter loads with plain transformers + PEFT and changes the model's outputs.
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    batch = _batch(data_dir, processor, n=2)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(**{k: v for k, v in batch.items() if k != "labels"}).logits
        tuned = PeftModel.from_pretrained(base, str(run / "final_model")).eval()
        tuned_logits = tuned(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-3


def test_existing_run_is_never_overwritten(tmp_path, train_cmd, capsys):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "keep.txt").write_text("mine")
    assert main(train_cmd(tmp_path, "r1", "--max_steps", "1")) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "r1" / "keep.txt").read_text() == "mine"


def test_resume_continues_from_newest_checkpoint(tmp_path, train_cmd, caplog):
    assert main(train_cmd(tmp_path, "r1", "--max_steps", "4", "--eval_steps", "2", "--save_total_limit", "3")) == 0
    run = tmp_path / "r1"
    # Simulate an interruption after step 2: the later checkpoint and the final adapter never got written.
    import shutil

    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "final_model")
    caplog.set_level("INFO")
    assert main(train_cmd(tmp_path, "r1", "--max_steps", "6", "--eval_steps", "2", "--resume")) == 0
    assert "checkpoint-2" in caplog.text and "Resuming from" in caplog.text
    resumes = json.loads((run / "run_config.json").read_text())["resumes"]
    assert resumes[-1]["changed"] == {"max_steps": {"was": 4, "now": 6}, "save_total_limit": {"was": 3, "now": 2}}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and "before" in metrics
    assert (run / "final_model" / "adapter_model.safetensors").is_file()
    state = json.loads((run / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "eval_loss" in e] == [2, 4, 6]


@pytest.mark.parametrize(
    "change, needle",
    [
        (["--train_dir", "/nonexistent/folder"], "--train_dir /nonexistent/folder does not exist"),
        (["--quantization_bits", "3"], "--quantization_bits must be one of 4, 8, 16, 32; got 3"),
        (["--lora_target_modules", "query,nope"], "--lora_target_modules names nope"),
        (["--split_ratio", "2", "--lora_r", "0"], "--lora_r must be >= 1"),
        (["--model_name", "/nonexistent/model"], "--model_name"),
        (["--metric_for_best_model", "accuracy"], "--metric_for_best_model must be one of"),
    ],
)
def test_bad_input_is_a_clean_error(tmp_path, train_cmd, capsys, change, needle):
    assert main(train_cmd(tmp_path, "r1", "--max_steps", "1") + change) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_empty_folder_and_unmatched_csv_are_clean_errors(tmp_path, train_cmd, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(train_cmd(tmp_path, "r1") + ["--train_dir", str(empty)]) == 2
    assert "holds no images" in capsys.readouterr().err
    csv = tmp_path / "other.csv"
    csv.write_text("image_name,caption\nnot_here.jpg,a cat\n")
    assert main(train_cmd(tmp_path, "r2") + ["--captions_file", str(csv)]) == 2
    err = capsys.readouterr().err
    assert "--captions_file" in err and "matches an image" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "bits, layer_class, dtype",
    [(4, "Linear4bit", torch.uint8), (8, "Linear8bitLt", torch.int8), (16, "Linear", torch.bfloat16), (32, "Linear", torch.float32)],
)
def test_quantization_bits_load_the_stated_layers_and_dtypes(tiny_model_dir, bits, layer_class, dtype):
    model = load_base_model(_config(tiny_model_dir, quantization_bits=bits), "cpu")
    query = model.git.encoder.layer[0].attention.self.query
    assert type(query).__name__ == layer_class and query.weight.dtype == dtype
    assert model.git.image_encoder.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == dtype


@pytest.mark.parametrize("bits", ["8", "16", "32"])
def test_other_precisions_train(tmp_path, train_cmd, bits):
    args = train_cmd(tmp_path, f"q{bits}", "--max_steps", "1", "--quantization_bits", bits)
    args[args.index("--test_dir"):args.index("--test_dir") + 2] = []  # no validation: a precision smoke test
    assert main(args + ["--split_ratio", "0"]) == 0
    assert (tmp_path / f"q{bits}" / "final_model" / "adapter_model.safetensors").is_file()
    settings = json.loads((tmp_path / f"q{bits}" / "run_config.json").read_text())
    assert settings["quantization_bits"] == int(bits) and settings["precision"]


@pytest.mark.parametrize("native, expected, autocast", [(True, torch.bfloat16, "bf16"), (False, torch.float16, "fp16")])
def test_gpu_precision_uses_bf16_only_where_native(monkeypatch, native, expected, autocast):
    # A T4/V100 "supports" bf16 by emulation only: the probe answers True unless emulation is excluded.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    config = Config(mode="train", model_name="m")
    assert resolve_compute_dtype(config, "cuda") == expected
    assert resolve_base_dtype(config.replace(quantization_bits=16), "cuda") == expected
    assert training_autocast(config, "cuda") == autocast
    assert training_autocast(config.replace(quantization_bits=16), "cuda") == autocast
    assert f"training under {autocast} autocast" in describe_precision(config, "cuda")
    assert training_autocast(config.replace(quantization_bits=32), "cuda") is None
    assert resolve_compute_dtype(config.replace(bnb_4bit_compute_dtype="float32"), "cuda") == torch.float32


def test_truncated_captions_are_counted_and_named(tmp_path, train_cmd, tiny_model_dir, data_dir, caplog):
    caplog.set_level("WARNING")
    args = train_cmd(tmp_path, "short", "--max_steps", "1", "--max_length", "10", "--split_ratio", "0")
    args[args.index("--test_dir"):args.index("--test_dir") + 2] = []
    assert main(args) == 0
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    captions = [e.caption for e in collect_examples(data_dir / "train", data_dir / "captions.csv")]
    expected = sum(len(tokenizer(c).input_ids) > 10 for c in captions)
    assert 0 < expected < len(captions)
    assert json.loads((tmp_path / "short" / "run_config.json").read_text())["truncated_train_captions"] == expected
    assert f"{expected} of {len(captions)} training captions are longer than --max_length 10" in caplog.text


def test_training_prints_nothing_to_stdout(tmp_path, train_cmd, capsys):
    assert main(train_cmd(tmp_path, "quiet", "--max_steps", "2", "--logging_steps", "1")) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "is_gradient_checkpointing" not in captured.err


def test_generation_length_defaults_to_the_training_length():
    assert Config(mode="inference").generation_tokens == 40
    assert Config(mode="inference", max_length=24).generation_tokens == 24
    assert apply_run_settings(Config(mode="inference"), {"max_length": 60}).generation_tokens == 60
    assert Config(mode="inference", max_length=24, max_new_tokens=5).generation_tokens == 5


def test_trainer_loss_over_caption_logits_equals_the_models_own_loss(tiny_model_dir, data_dir, tmp_path):
    """The Trainer computes logits for the caption positions only; the loss must be GIT's own, which a
    test above checks against a hand-computed cross-entropy."""
    from scripts.caption_trainer import CaptionTrainer

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    config = _config(tiny_model_dir, bnb_4bit_compute_dtype="float32")
    model = prepare_for_training(load_base_model(config, "cpu"), config).eval()
    batch = _batch(data_dir, processor)
    trainer = CaptionTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))
    with torch.no_grad():
        full = model(**batch)
        loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
        summed = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(7))
    assert loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
    assert outputs.logits.shape[1] == batch["input_ids"].shape[1] < full.logits.shape[1]
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert summed.item() == pytest.approx(full.loss.item() * tokens / 7, rel=1e-5)


def test_the_seed_decides_the_adapter_whatever_ran_before(tmp_path, train_cmd):
    """--seed decides LoRA's initial weights too (PEFT draws them from torch's generator, whose start seed is
    random per process): two runs with one seed, the generator disturbed in between, write the same adapter;
    another seed, another."""
    from safetensors.torch import load_file

    def adapter(run: str, *extra: str) -> dict:
        torch.manual_seed(len(run))  # whatever the process did before
        torch.rand(7)
        assert main(train_cmd(tmp_path, run, "--max_steps", "2", "--cache_image_features", "off", *extra)) == 0
        return load_file(tmp_path / run / "final_model" / "adapter_model.safetensors")

    first, again, other = adapter("s1"), adapter("s2again"), adapter("s3", "--seed", "7")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
