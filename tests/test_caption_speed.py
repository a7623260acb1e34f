"""--compile and --caption_precision int8 (models/caption_speed.py): same captions, eager fallback, auto's decision."""

import csv
import logging
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from git_qlora_main import main
from models import caption_speed
from models.caption_speed import DEVICE_COSTS, FastVisionTower, plan_compile, speed_up_vision_tower, vision_flops_per_image
from scripts.inference import caption_folder
from utils.dataset_utils import find_images


@pytest.fixture(autouse=True)
def private_inductor_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def _captions(model, processor, data_dir, batch_size=3):
    names = sorted(find_images(data_dir / "test"))  # 8 images at batch 3: the last batch is short
    return caption_folder(model, processor, data_dir / "test", names, batch_size, 8, progress=False).captions


def _tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoProcessor.from_pretrained(tiny_model_dir)


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return {row[0]: row[1] for row in list(csv.reader(handle))[1:]}


def test_auto_compiles_only_when_the_saving_exceeds_the_compile_time():
    costs = {"cpu": {"cold": 40.0, "warm": 8.0, "speedup": 1.25, "flops_per_second": 1e11}}
    # Hand computation: 1e10 FLOP per image at 1e11 FLOP/s = 0.1 s; compiled saves 0.1 * (1 - 1/1.25) = 0.02 s each.
    assert not plan_compile("auto", 1999, "cpu", 1e10, None, costs).use  # saves 39.98 s < 40 s
    assert plan_compile("auto", 2001, "cpu", 1e10, None, costs).use  # saves 40.02 s
    assert plan_compile("auto", 500, "cpu", 1e10, 8.0, costs).use  # compiled before: 10 s saved > 8 s
    assert not plan_compile("auto", 300, "cpu", 1e10, 8.0, costs).use
    assert "does not pay for 300 images" in plan_compile("auto", 300, "cpu", 1e10, 8.0, costs).reason
    assert plan_compile("on", 1, "cpu", 1e10, None, costs).use and not plan_compile("off", 10**9, "cpu", 1e10, None, costs).use


def test_auto_compiles_the_decoder_only_where_that_saves_time():
    costs = {"cpu": {"cold": 40.0, "warm": 8.0, "speedup": 1.25, "flops_per_second": 1e11,
                     "decode_cold": 10.0, "decode_saved_per_token": 1e-3},
             "cpu-fp32": {"cold": 40.0, "warm": 8.0, "speedup": 1.25, "flops_per_second": 1e11,
                          "decode_cold": 10.0, "decode_saved_per_token": -1e-3}}
    # bf16: 0.02 s (tower) + 20 tokens x 1e-3 s (decoder) saved per image against 40 + 10 s of compiling.
    assert not plan_compile("auto", 1249, "cpu", 1e10, None, costs, tokens=20, dtype=torch.bfloat16).use  # 49.96 s
    bf16 = plan_compile("auto", 1251, "cpu", 1e10, None, costs, tokens=20, dtype=torch.bfloat16)
    assert bf16.use and bf16.decode and "on cpu (" in bf16.reason
    # fp32, where compiling the decoder loses time: the tower alone decides (0.02 s per image against 40 s).
    assert not plan_compile("auto", 1999, "cpu", 1e10, None, costs, tokens=20, dtype=torch.float32).use
    fp32 = plan_compile("auto", 2001, "cpu", 1e10, None, costs, tokens=20, dtype=torch.float32)
    assert fp32.use and not fp32.decode
    assert "on cpu in fp32" in fp32.reason and "the decoder stays eager" in fp32.reason
    # --compile on compiles both wherever it runs.
    assert plan_compile("on", 1, "cpu", 1e10, None, costs, tokens=20, dtype=torch.float32).decode
    assert not plan_compile("on", 1, "cpu", 1e10, None, costs, tokens=0, dtype=torch.float32).decode
    assert caption_speed.costs_key("cpu", torch.float32) == "cpu-fp32"
    assert caption_speed.costs_key("cpu", torch.bfloat16) == "cpu" and caption_speed.costs_key("cuda", torch.float32) == "cuda"


def test_auto_on_an_fp32_tower_compiles_it_and_leaves_the_decoder_eager(tiny_model_dir, data_dir, monkeypatch):
    from models.greedy_decoding import fast_decoding

    model, processor = _tiny(tiny_model_dir)  # fp32, as on a CPU without native bf16
    eager = _captions(model, processor, data_dir)
    monkeypatch.setattr(caption_speed, "COMPILE_BACKEND", "eager")
    paying = {"cold": 0.0, "warm": 0.0, "speedup": 2.0, "flops_per_second": 1.0, "decode_cold": 0.0}
    monkeypatch.setitem(caption_speed.DEVICE_COSTS, "cpu-fp32", {**paying, "decode_saved_per_token": -1.0})
    torch._dynamo.reset()
    done = speed_up_vision_tower(model, "auto", "auto", "cpu", 8, 3, tokens=8)
    assert done == "compiled vision tower, batch 3"
    assert isinstance(model.git.image_encoder, FastVisionTower) and fast_decoding(model) is None
    assert _captions(model, processor, data_dir) == eager
    # Where compiling the decoder saves time, auto compiles it with the tower.
    monkeypatch.setitem(caption_speed.DEVICE_COSTS, "cpu-fp32", {**paying, "decode_saved_per_token": 1.0})
    model, _ = _tiny(tiny_model_dir)
    torch._dynamo.reset()
    assert "decoder" in speed_up_vision_tower(model, "auto", "auto", "cpu", 8, 3, tokens=8)
    assert fast_decoding(model) is not None


def test_vision_flops_of_git_base_match_a_hand_count():
    from transformers import GitVisionConfig

    # ViT-B/16 at 224 px: 197 tokens, 12 layers, width 768, MLP 3072 -> about 2 x 17.6 GMAC (the usual 17.6 GFLOPs
    # quoted as MACs) plus attention: 35-36 GFLOP per image.
    flops = vision_flops_per_image(GitVisionConfig())
    assert 34e9 < flops < 37e9
    assert DEVICE_COSTS["cpu"]["cold"] > DEVICE_COSTS["cpu"]["warm"]


def test_auto_leaves_a_small_job_eager(tiny_model_dir, caplog):
    caplog.set_level(logging.INFO)
    model, _ = _tiny(tiny_model_dir)
    assert speed_up_vision_tower(model, "auto", "auto", "cpu", 8, 4) == ""
    assert not isinstance(model.git.image_encoder, FastVisionTower)
    assert "--compile auto: compiling does not pay for 8 images" in caplog.text


def test_static_graph_pads_the_last_batch_and_gives_the_same_captions(tiny_model_dir, data_dir, monkeypatch):
    model, processor = _tiny(tiny_model_dir)
    eager = _captions(model, processor, data_dir)
    monkeypatch.setattr(caption_speed, "COMPILE_BACKEND", "eager")  # dynamo's graph without inductor: seconds, not tens
    torch._dynamo.reset()
    assert "compiled" in speed_up_vision_tower(model, "on", "auto", "cpu", 8, 3)
    with torch._dynamo.config.patch(error_on_recompile=True):  # the short last batch must not recompile
        assert _captions(model, processor, data_dir) == eager
    tower = model.git.image_encoder
    assert tower.compiled is not None and not tower.first_call  # it ran compiled, no fallback


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(tiny_model_dir, data_dir, monkeypatch, caplog):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler on this machine")

    model, processor = _tiny(tiny_model_dir)
    eager = _captions(model, processor, data_dir)
    monkeypatch.setattr(caption_speed, "COMPILE_BACKEND", broken_backend)
    torch._dynamo.reset()
    speed_up_vision_tower(model, "on", "auto", "cpu", 8, 3)
    with caplog.at_level(logging.WARNING):
        assert _captions(model, processor, data_dir) == eager
    warnings = [r for r in caplog.records if "Compiling the vision tower failed" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler on this machine" in warnings[0].getMessage()


def test_int8_captions_agree_with_fp32_on_the_test_set(trained_run, data_dir, tmp_path, caplog):
    pytest.importorskip("torchao")
    if caption_speed.int8_unavailable("cpu"):
        pytest.skip(caption_speed.int8_unavailable("cpu"))
    caplog.set_level(logging.INFO)
    common = ["--inference", "--test_dir", str(data_dir / "test"), "--output_dir", str(trained_run), "--num_workers", "0",
              "--max_new_tokens", "8", "--compile", "off"]
    assert main(common + ["--caption_precision", "fp32", "--predictions_file", str(tmp_path / "fp32.csv")]) == 0
    assert main(common + ["--caption_precision", "int8", "--predictions_file", str(tmp_path / "int8.csv")]) == 0
    assert "int8 vision tower (torchao)" in caplog.text
    exact, int8 = _read_csv(tmp_path / "fp32.csv"), _read_csv(tmp_path / "int8.csv")
    assert len(exact) == 8 and sum(int8[name] == caption for name, caption in exact.items()) >= 7


def test_auto_captions_with_a_compiled_int8_tower_only_where_int8_pays(tiny_model_dir, data_dir, monkeypatch, caplog):
    if caption_speed.int8_unavailable("cpu") and "torchao" in caption_speed.int8_unavailable("cpu"):
        pytest.skip("torchao is not installed")
    from torchao.utils import TorchAOBaseTensor

    monkeypatch.setattr(caption_speed, "COMPILE_BACKEND", "eager")
    int8_runs_here = caption_speed.cpu_has_vnni()  # before the host's flags are replaced below
    model, processor = _tiny(tiny_model_dir)
    exact = _captions(model, processor, data_dir)
    hosts = {"AVX-512 VNNI, no AMX": {"avx512f", "avx512_vnni"}, "AMX": {"avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"},
             "AVX2": {"avx2", "fma"}}
    for host, flags in hosts.items():
        monkeypatch.setattr(caption_speed, "cpu_flags", lambda flags=flags: flags)
        # (precision, for captions rather than the feature cache): only auto, and only for captions, may pick int8.
        for precision, captions in (("auto", True), ("auto", False), ("fp32", True)):
            model, _ = _tiny(tiny_model_dir)
            torch._dynamo.reset()
            caplog.clear()
            with caplog.at_level(logging.INFO):
                done = speed_up_vision_tower(model, "on", precision, "cpu", 8, 3, tokens=8, int8_where_it_pays=captions)
            int8 = host == "AVX-512 VNNI, no AMX" and precision == "auto" and captions
            fc1 = model.git.image_encoder.encoder.vision_model.encoder.layers[0].mlp.fc1
            assert ("int8 vision tower" in done) == int8 == ("compiled in int8" in caplog.text), (host, precision, captions)
            assert isinstance(fc1.weight, TorchAOBaseTensor) == int8 and "compiled vision tower" in done
            if int8 and int8_runs_here:  # int8 activations and weights: near fp32, as --caption_precision int8 is
                int8_captions = _captions(model, processor, data_dir)
                assert sum(int8_captions[name] == caption for name, caption in exact.items()) >= 7


def test_int8_without_torchao_warns_once_and_captions_as_before(tiny_model_dir, data_dir, monkeypatch, caplog):
    model, processor = _tiny(tiny_model_dir)
    eager = _captions(model, processor, data_dir)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    with caplog.at_level(logging.WARNING):
        assert speed_up_vision_tower(model, "off", "int8", "cpu", 8, 3) == ""
    assert _captions(model, processor, data_dir) == eager
    assert [r.getMessage() for r in caplog.records if "torchao is not installed" in r.getMessage()] != []


def test_caption_precision_conflicting_with_the_compute_dtype_is_one_error(capsys, tmp_path):
    code = main(["--inference", "--test_dir", str(tmp_path), "--caption_precision", "bf16", "--bnb_4bit_compute_dtype",
                 "float32", "--compile", "sometimes"])
    err = capsys.readouterr().err
    assert code == 2 and "--caption_precision bf16" in err and "--compile must be one of auto, on, off" in err


@pytest.mark.slow
def test_inductor_compiled_captions_equal_eager(tiny_model_dir, data_dir):
    model, processor = _tiny(tiny_model_dir)
    eager = _captions(model, processor, data_dir)
    torch._dynamo.reset()
    speed_up_vision_tower(model, "on", "auto", "cpu", 8, 3)
    assert _captions(model, processor, data_dir) == eager
    assert model.git.image_encoder.compiled is not None and not model.git.image_encoder.first_call


def test_cache_filling_tower_gives_the_training_towers_features_and_is_put_back(tiny_model_dir, data_dir, monkeypatch):
    from PIL import Image

    from models.caption_speed import fast_vision_tower_for_filling
    from models.git_qlora import load_base_model
    from models.vision_cache import encode_images
    from utils.config import Config

    model = load_base_model(Config(mode="train", model_name=str(tiny_model_dir)), "cpu")  # the 4-bit training base
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    images = [Image.open(data_dir / "test" / name).convert("RGB") for name in sorted(find_images(data_dir / "test"))[:5]]
    pixels = processor(images=images, return_tensors="pt").pixel_values
    original = model.git.image_encoder
    reference = encode_images(model, pixels, torch.bfloat16)
    monkeypatch.setattr(caption_speed, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    with fast_vision_tower_for_filling(model, "on", "auto", "cpu", 5, 4, torch.bfloat16):
        assert isinstance(model.git.image_encoder, FastVisionTower)
        fast = torch.cat([encode_images(model, pixels[:4], torch.bfloat16), encode_images(model, pixels[4:], torch.bfloat16)])
    assert model.git.image_encoder is original
    # The same values up to bf16 rounding: the 4-bit kernels dequantize to bf16 on every call, the copy once.
    assert (fast.float() - reference.float()).norm() / reference.float().norm() < 0.02


@pytest.mark.parametrize("compile_setting", ["off", "auto"])
def test_uncompiled_cache_filling_uses_the_tower_dequantized_once_where_bf16_is_the_dtype(tiny_model_dir, data_dir, compile_setting):
    """Not compiled (off, or auto for 5 images): on the CPU in bf16 the filling tower is a copy with the 4-bit layers
    dequantized once, whose features are the 4-bit tower's bit for bit; in fp32 the training model's own tower fills."""
    import bitsandbytes as bnb
    from PIL import Image

    from models.caption_speed import fast_vision_tower_for_filling
    from models.git_qlora import keep_4bit_weights_unpacked, load_base_model
    from models.vision_cache import encode_images
    from utils.config import Config

    model = load_base_model(Config(mode="train", model_name=str(tiny_model_dir)), "cpu")
    keep_4bit_weights_unpacked(model)  # as training's model: the 4-bit kernels it trains with, not the packed inference ones
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    images = [Image.open(data_dir / "test" / name).convert("RGB") for name in sorted(find_images(data_dir / "test"))[:5]]
    pixels = processor(images=images, return_tensors="pt").pixel_values
    original = model.git.image_encoder
    reference = encode_images(model, pixels, torch.bfloat16)
    with fast_vision_tower_for_filling(model, compile_setting, "auto", "cpu", 5, 4, torch.bfloat16):
        tower = model.git.image_encoder
        assert tower is not original and not isinstance(tower, FastVisionTower)
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in tower.modules())
        assert {p.dtype for p in tower.parameters()} == {p.dtype for p in original.parameters() if p.dtype.is_floating_point} | {torch.bfloat16}
        fast = encode_images(model, pixels, torch.bfloat16)
    assert model.git.image_encoder is original
    assert torch.equal(fast, reference)  # the training tower's arithmetic, only dequantized once
    with fast_vision_tower_for_filling(model, compile_setting, "auto", "cpu", 5, 4, torch.float32):
        assert model.git.image_encoder is original
