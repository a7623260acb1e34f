"""Past the eager ceiling: GIT's vision tower compiled (--compile) and/or in int8 (--caption_precision int8) for
captioning and feature-cache filling, and for greedy captions the decoder's prefill and one-token step compiled
(models/greedy_decoding.py), with eager as the fallback for anything that fails.

The vision tower is over half of a caption's time and all of cache filling; a caption runs it once per batch.
`speed_up_vision_tower` puts a `FastVisionTower` in its place: it runs a compiled (static-shape) copy at one
batch size, padding a short last batch so nothing recompiles, and falls back to the eager tower, with one
warning, the first time compiling or running the compiled graph fails; `CompiledPart` does the same for the
decoder's two parts. Inductor's on-disk cache lives under the
user cache (TORCHINDUCTOR_CACHE_DIR, unless set), so a second run loads the compiled kernels instead of
compiling again; inductor writes its cache entries to a temporary file and renames them into place, so an
interrupted compile (Ctrl-C) leaves nothing that a later run would read as an entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from utils.user_cache import user_cache_dir

logger = logging.getLogger(__name__)

# Measured on a git-base-sized vision tower (ViT-B/16, 224 px, batch 8), see README "Compiled and int8 captioning".
# compile: seconds of the first call (cold: empty inductor cache; warm: the cache filled by an earlier run);
# speedup: eager seconds / compiled seconds per image; flops_per_second: the eager tower's effective rate.
# decode_*: the decoder's prefill and one-token step (models/greedy_decoding.py) compiled at batch 8: compile seconds,
# and the seconds they save per image and generated token (a step 28-33 ms eager, 21 ms compiled, over 8 images).
# With inductor's freezing (below), 2 December 2026: the tower 60 s cold, 17 s warm, 0.58-0.63 s a batch against
# 0.93-1.09 eager; prefill + step 24-25 s cold or warm.
DEVICE_COSTS = {
    "cpu": {"cold": 60.0, "warm": 17.0, "speedup": 1.6, "flops_per_second": 2.8e11,
            "decode_cold": 25.0, "decode_saved_per_token": 1.2e-3},
    # A CPU computing in fp32 (no native bf16: AVX2 only), measured on an AMD EPYC on 3 December 2026, git-base-sized,
    # batch 8, 64 images: the eager tower 0.43 s per image (35 GFLOP), compiled 0.31 s (1.4x; 39 s cold, 29 s warm).
    # Compiling the decoder too made captioning slower there: merged 1.62 images/s with the tower compiled, 1.27
    # with the decoder as well (eager 1.32); the adapter 1.32 and 1.25 (eager 0.99): 8.5 and 2 ms lost per image
    # and token (20 tokens), after a decoder compile of ~50 s. So auto leaves the decoder eager there.
    "cpu-fp32": {"cold": 40.0, "warm": 29.0, "speedup": 1.4, "flops_per_second": 8.2e10,
                 "decode_cold": 50.0, "decode_saved_per_token": -5e-3},
    # Not measured in this session (no GPU at hand): conservative guesses, so auto compiles only huge jobs there.
    "cuda": {"cold": 60.0, "warm": 15.0, "speedup": 1.2, "flops_per_second": 1.0e14,
             "decode_cold": 60.0, "decode_saved_per_token": 1e-5},
}
# Weights are constants of the compiled graphs (inductor's freezing: prepacked oneDNN weights on the CPU, 1.2x the
# step and 1.1x the tower here), which is right because captioning never changes them. Set around each call, as
# the compile happens in the first: torch.compile(options={"freezing": True}) is silently not applied (torch 2.14).
INFERENCE_CONFIG = {"freezing": True}
COMPILED_RECORD = "git_qlora_compiled.json"  # what this project compiled before, and how long it took
INT8_MIN_TORCHAO = (0, 8)
COMPILE_BACKEND = "inductor"  # tests put a failing backend here


@dataclass(frozen=True)
class CompilePlan:
    use: bool  # compile the vision tower
    reason: str
    decode: bool = False  # and, for greedy captions, the decoder's prefill and step


def costs_key(device: str, dtype: torch.dtype) -> str:
    """Which DEVICE_COSTS entry describes computing in `dtype` on `device`: a CPU in fp32 has its own."""
    return "cpu-fp32" if device == "cpu" and dtype == torch.float32 else device


def vision_flops_per_image(encoder_config) -> float:
    """Multiply-adds x 2 of the vision tower's Linear layers and attention for one image."""
    tokens = (encoder_config.image_size // encoder_config.patch_size) ** 2 + 1
    width, mlp, layers = encoder_config.hidden_size, encoder_config.intermediate_size, encoder_config.num_hidden_layers
    per_token = 2 * (4 * width * width + 2 * width * mlp) + 4 * tokens * width
    return float(layers * tokens * per_token)


def plan_compile(setting: str, images: int, device: str, flops_per_image: float, cached_seconds: float | None,
                 costs: dict | None = None, tokens: int = 0, cached_decode_seconds: float | None = None,
                 dtype: torch.dtype | None = None) -> CompilePlan:
    """Whether to compile the vision tower, and with `tokens` > 0 the decoder's prefill and step too (--compile
    auto|on|off), and why, for the one log line.

    auto compiles when the time it saves on `images` images (this process's share) exceeds the time compiling
    takes: the seconds this project measured the last time it compiled the same graph here (cached_seconds,
    inductor's cache then being warm), else the device's cold figure; the costs are those of computing in `dtype`
    there (costs_key). The decoder is compiled with the tower only where compiling it saves time.
    """
    if setting == "off":
        return CompilePlan(False, "--compile off")
    if setting == "on":
        return CompilePlan(True, "--compile on", decode=bool(tokens))
    table = costs or DEVICE_COSTS
    key = costs_key(device, dtype) if dtype is not None else device
    cost = table.get(key, table.get(device, DEVICE_COSTS["cpu"]))
    eager = images * flops_per_image / cost["flops_per_second"]
    saved = eager * (1 - 1 / cost["speedup"])
    compile_seconds = cached_seconds if cached_seconds is not None else cost["cold"]
    decode = bool(tokens) and cost["decode_saved_per_token"] > 0
    if decode:
        saved += images * tokens * cost["decode_saved_per_token"]
        compile_seconds += cached_decode_seconds if cached_decode_seconds is not None else cost["decode_cold"]
    cache = "compiled before here, inductor cache warm" if cached_seconds is not None else "first compile on this machine"
    where = f"{device} in fp32" if key == "cpu-fp32" else device
    pays = saved > compile_seconds
    reason = (f"--compile auto: compiling {'pays' if pays else 'does not pay'} for {images} images on {where} "
              f"(saves ~{saved:.0f} s; compiling takes ~{compile_seconds:.0f} s, {cache})")
    if pays and tokens and not decode:
        reason += "; the decoder stays eager, compiling it does not pay there"
    return CompilePlan(pays, reason, decode=decode and pays)


def inductor_cache_dir() -> Path:
    """Inductor's on-disk cache: TORCHINDUCTOR_CACHE_DIR if the user set it, else under the user cache."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its own default (under /tmp, lost on reboot) into the variable once it has looked it up.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(user_cache_dir("torchinductor"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_key(encoder: torch.nn.Module, batch_size: int, precision: str, device: str) -> str:
    """What determines the compiled graph: shapes, dtype, precision, batch size, device and torch version."""
    dtype = next(encoder.parameters()).dtype
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    text = json.dumps([encoder.config.to_dict(), batch_size, str(dtype), precision, name, torch.__version__], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_record() -> dict:
    try:
        record = json.loads((inductor_cache_dir() / COMPILED_RECORD).read_text(encoding="utf-8"))
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_compile_seconds(key: str) -> float | None:
    entry = _read_record().get(key)
    return float(entry["seconds"]) if isinstance(entry, dict) and "seconds" in entry else None


def _remember_compile(key: str, seconds: float) -> None:
    """Record the compile time, atomically (several ranks may write at once); it is only a hint for auto."""
    from utils.io import write_json_atomic

    record = _read_record()
    record[key] = {"seconds": round(seconds, 2), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        write_json_atomic(inductor_cache_dir() / COMPILED_RECORD, record)
    except OSError as error:
        logger.debug("Could not record the compile time: %s", error)


# ---------------------------------------------------------------------------
# int8 (torchao)
# ---------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo), or none where they cannot be read."""
    try:
        return set(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split())
    except OSError:
        return set()


def cpu_has_vnni() -> bool:
    """int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX-INT8): without them int8 is slower than bf16."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_pays_under_auto(device: str) -> bool:
    """Whether --caption_precision auto captions with an int8 vision tower where the tower is compiled: on a CPU with
    AVX-512 VNNI and no AMX, with torchao. There, on 4 December (git-base-sized, batch 8), the compiled int8 tower
    took 0.61-0.64 s a batch against 0.77-0.81 s in bf16, and compiled merged captioning ran at 1.31-1.52x the
    eager ceiling over three runs against 1.19-1.31x in bf16, with captions equal to the fp32 path's as often as
    bf16's are (the demo's 60 test pictures over eight seeds: 95-98.3% either way; 300 fresh pictures over three
    seeds: 96-99%, bf16 96.3-99%). Uncompiled, int8 is slower than bf16 (0.76-0.95x). With AMX, bf16 compiled
    was the faster (2 December: 7.56 against 6.85 images/s); AVX-VNNI without AVX-512 and GPUs are not measured,
    so they keep the compute dtype."""
    flags = cpu_flags()
    return (device == "cpu" and "avx512_vnni" in flags and not flags & {"amx_bf16", "amx_tile", "amx_int8"}
            and int8_unavailable(device) is None)


def int8_unavailable(device: str) -> str | None:
    """Why int8 cannot run here (for the one warning), or None."""
    quiet = logging.getLogger("torch.utils._pytree")  # torchao 0.18's import warns about torch's own deprecations
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install 'torchao>=0.8')"
    finally:
        quiet.setLevel(level)
    version = tuple(int(p) for p in torchao.__version__.split("+")[0].split(".")[:2] if p.isdigit())
    if version < INT8_MIN_TORCHAO:
        return f"torchao {torchao.__version__} is too old (pip install -U 'torchao>=0.8')"
    if device == "cpu" and not cpu_has_vnni():
        return "this CPU has no int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX), where int8 is slower than bf16"
    return None


# fc2 of the last blocks: measured to carry most of the int8 error of the features (README); they stay as they are.
INT8_KEEP_LAST_FC2 = 2


def int8_layer_filter(num_layers: int, keep_last_fc2: int = INT8_KEEP_LAST_FC2):
    """torchao's filter: every Linear of the tower except fc2 of the last `keep_last_fc2` blocks."""

    def quantize(module: torch.nn.Module, name: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or "lora_" in name:  # a vision adapter stays as trained
            return False
        parts = name.split(".")
        if parts[-1] == "fc2" and "layers" in parts:
            return int(parts[parts.index("layers") + 1]) < num_layers - keep_last_fc2
        return True

    return quantize


def quantize_vision_int8(encoder: torch.nn.Module) -> None:
    """int8 dynamic activations, int8 weights on the tower's Linear layers, in place (torchao)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(encoder, Int8DynamicActivationInt8WeightConfig(), filter_fn=int8_layer_filter(encoder.config.num_hidden_layers))


def dequantize_4bit_layers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replace bitsandbytes Linear4bit layers by plain Linear ones holding the dequantized weights (in place):
    int8 and inductor need plain weights. The values are those the 4-bit kernels compute with."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for name, child in list(module.named_modules()):
        if isinstance(child, bnb.nn.Linear4bit):
            data, state = child.weight.data, child.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):  # repacked by an inference call (GIT_NOTES.md)
                data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, state)
            weight = bnb.functional.dequantize_4bit(data, state).to(dtype)
            plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=weight.device, dtype=dtype)
            plain.weight.data.copy_(weight)
            if child.bias is not None:
                plain.bias.data.copy_(child.bias.data.to(dtype))
            parent_name, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, leaf, plain)


# ---------------------------------------------------------------------------
# The stand-in vision tower
# ---------------------------------------------------------------------------


def compile_for_inference(module: torch.nn.Module, backend=None):
    """torch.compile for fixed weights and shapes (inductor: weights frozen into the graph)."""
    backend = backend or COMPILE_BACKEND
    compiled = torch.compile(module, dynamic=False, backend=backend)
    if backend != "inductor":
        return compiled

    def frozen(*inputs):
        with torch._inductor.config.patch(INFERENCE_CONFIG):
            return compiled(*inputs)

    return frozen


def warn_compile_failed(what: str, error: Exception) -> None:
    cause = getattr(error, "inner_exception", None) or error  # dynamo wraps the compiler's own error
    text = str(cause).strip().splitlines()
    logger.warning("Compiling %s failed (%s: %s); it runs eagerly instead, with the same results.",
                   what, type(cause).__name__, text[0][:300] if text else "")


class _LastHiddenState(torch.nn.Module):
    """The transformer of the tower returning a plain tensor: what torch.compile gets (no output classes)."""

    def __init__(self, vision_model: torch.nn.Module):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).last_hidden_state


class CompiledPart:
    """A module compiled for fixed shapes, or the module itself after a failure; `what` names it in the log.
    Running a module again eagerly gives its result: the tower is pure, and the decoder's parts only overwrite
    their own cache slots."""

    def __init__(self, module: torch.nn.Module, what: str, key: str | None = None, backend=None):
        self.module, self.what, self.key = module, what, key
        self.compiled = compile_for_inference(module, backend)
        self.first_call = True

    def __call__(self, *inputs):
        if self.compiled is None:
            return self.module(*inputs)
        try:
            start = time.perf_counter()
            result = self.compiled(*inputs)
        except Exception as error:  # noqa: BLE001 - any compiler or runtime failure: eager, same results
            warn_compile_failed(self.what, error)
            self.compiled = None
            return self.module(*inputs)
        if self.first_call:
            self.first_call = False
            seconds = time.perf_counter() - start
            logger.info("Compiled %s in %.1f s (inductor cache: %s)", self.what, seconds, inductor_cache_dir())
            if self.key is not None:
                _remember_compile(self.key, seconds)
        return result


class FastVisionTower(torch.nn.Module):
    """Stands in for GIT's image encoder: a compiled graph for batches of up to `batch_size` images (padded to
    exactly that, so the static graph never recompiles), the eager tower for anything else or after a failure."""

    def __init__(self, encoder: torch.nn.Module, batch_size: int, compile_graph: bool, key: str | None = None,
                 backend=None):
        super().__init__()
        self.encoder, self.config, self.batch_size = encoder, encoder.config, batch_size
        graph = _LastHiddenState(encoder.vision_model)
        self.part = CompiledPart(graph, "the vision tower", key, backend) if compile_graph else None
        self.train(encoder.training)

    @property
    def compiled(self):
        return self.part.compiled if self.part is not None else None

    @property
    def first_call(self) -> bool:
        return self.part is None or self.part.first_call

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs):
        count = pixel_values.shape[0]
        if self.compiled is None or interpolate_pos_encoding or kwargs or count > self.batch_size or self.training:
            return self.encoder(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        padded = pixel_values.to(self.encoder.vision_model.embeddings.patch_embedding.weight.dtype)
        if count < self.batch_size:
            padded = torch.cat([padded, padded.new_zeros((self.batch_size - count, *padded.shape[1:]))])
        return BaseModelOutputWithPooling(last_hidden_state=self.part(padded)[:count])


def _compile_decoding(model, batch_size: int, tokens: int, key: str) -> str:
    """Captions of `model` decode through a compiled prefill and one-token step (greedy, batch_size, tokens)."""
    from models.greedy_decoding import DecodeStep, FastDecoding, Prefill, set_fast_decoding
    from models.vision_cache import causal_lm

    lm = causal_lm(model)
    dequantize_4bit_layers(lm, lm.git.embeddings.word_embeddings.weight.dtype)
    peft_model, folded = getattr(model, "module", model), ""
    if hasattr(peft_model, "merge_adapter"):
        # A PeftModel: LoRA folded into the (now plain) base weights once, not two more products per layer and
        # token (the compiled adapter step was 0.74x the merged one). --merge_weights' arithmetic, in memory.
        unfolded = fold_lora_layers(peft_model)
        if unfolded:  # e.g. a LoRA over an int8 vision layer: that layer keeps its LoRA
            logger.info("%d adapter layers stay unfolded (%s); they add their LoRA products as before.",
                        len(unfolded), unfolded[0])
        else:
            folded = " (adapter folded into the weights)"
    capacity = lm.git.encoder.layer[0].attention.self.image_patch_tokens + tokens
    set_fast_decoding(lm, FastDecoding(batch_size, capacity,
                                       CompiledPart(Prefill(lm), "the decoder's prefill", f"{key}-prefill"),
                                       CompiledPart(DecodeStep(lm), "the decoder's step", f"{key}-step")))
    return f"compiled decoder, {tokens} tokens{folded}"


def fold_lora_layers(model: torch.nn.Module) -> list[str]:
    """Every LoRA layer's product added into its base weights, in place; what could not be folded, as
    "name: why". PEFT merges each layer by its own class, except a quantized layer's wrapper whose base
    dequantize_4bit_layers made plain: PEFT's 4-bit merge needs the quantized weight (and would quantize the sum
    back to 4 bits), so there the sum is done as its plain lora.Linear does it, in the plain weight's dtype."""
    from peft.tuners.lora import Linear as PlainLoraLinear
    from peft.tuners.lora import LoraLayer

    unfolded = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or layer.merged:
            continue
        base = layer.get_base_layer()
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        try:
            if type(base) is torch.nn.Linear and not isinstance(layer, PlainLoraLinear):
                if any(a in getattr(layer, "lora_variant", {}) for a in adapters):  # DoRA and the like
                    raise ValueError("a LoRA variant over a dequantized 4-bit layer")
                with torch.no_grad():
                    for adapter in adapters:
                        base.weight += layer.get_delta_weight(adapter).to(base.weight.dtype)
                        layer.merged_adapters.append(adapter)
            else:
                layer.merge(adapter_names=adapters)
        except Exception as error:  # noqa: BLE001 - the layer keeps its LoRA products, the captions stay right
            unfolded.append(f"{name}: {error}")
    return unfolded


def speed_up_vision_tower(model, compile_setting: str, precision: str, device: str, images: int, batch_size: int,
                          tokens: int = 0, int8_where_it_pays: bool = False) -> str:
    """Put the fast vision tower the settings ask for into `model` (a GitForCausalLM, PeftModel or DDP wrapper),
    in place, and with `tokens` > 0 (greedy captions of that many tokens at most) a compiled decoder step when the
    tower is compiled; returns what was done, for the log ("" when nothing changed). Never raises for a fast path
    that cannot run here: that is one warning and the eager tower. With `int8_where_it_pays` (captioning, not the
    feature cache, whose features training learns from), precision auto compiles an int8 tower where that was
    measured to be faster at the same agreement with fp32 (int8_pays_under_auto)."""
    from models.vision_cache import git_model

    git = git_model(model)
    encoder, done = git.image_encoder, []
    if isinstance(encoder, FastVisionTower):
        encoder = encoder.encoder
    dtype = encoder.vision_model.embeddings.patch_embedding.weight.dtype  # the tower's compute dtype (not 4-bit)
    if precision == "int8":
        reason = int8_unavailable(device)
        if reason:
            logger.warning("--caption_precision int8: %s; the vision tower runs in %s instead, with the same captions as without int8.",
                           reason, str(dtype).replace("torch.", ""))
        else:
            dequantize_4bit_layers(encoder, dtype)
            quantize_vision_int8(encoder)
            done.append("int8 vision tower (torchao)")
    key = compile_key(encoder, batch_size, precision, device)
    decode_key = f"{key}-decode-{tokens}"
    decode_seconds = [cached_compile_seconds(f"{decode_key}-{part}") for part in ("prefill", "step")]
    plan = plan_compile(compile_setting, images, device, vision_flops_per_image(encoder.config), cached_compile_seconds(key),
                        tokens=tokens, cached_decode_seconds=None if None in decode_seconds else sum(decode_seconds),
                        dtype=dtype)
    if compile_setting == "auto":
        logger.info("%s", plan.reason)
    if plan.use and precision == "auto" and int8_where_it_pays and int8_pays_under_auto(device):
        dequantize_4bit_layers(encoder, dtype)
        quantize_vision_int8(encoder)
        done.append("int8 vision tower (torchao; --caption_precision auto compiles int8 on this CPU)")
        key = compile_key(encoder, batch_size, "int8", device)
        decode_key = f"{key}-decode-{tokens}"
        logger.info("--caption_precision auto: the vision tower is compiled in int8 (torchao) on this CPU (AVX-512 VNNI, "
                    "no AMX), where it was measured faster than bf16 with captions as close to fp32's; "
                    "--caption_precision bf16 or fp32 keeps it in that dtype.")
    if plan.use:
        inductor_cache_dir()
        dequantize_4bit_layers(encoder, dtype)
        git.image_encoder = FastVisionTower(encoder, batch_size, compile_graph=True, key=key)
        done.append(f"compiled vision tower, batch {batch_size}")
        if plan.decode:
            done.append(_compile_decoding(model, batch_size, tokens, decode_key))
    else:
        git.image_encoder = encoder
    return ", ".join(done)


@contextmanager
def fast_vision_tower_for_filling(model, compile_setting: str, precision: str, device: str, images: int, batch_size: int,
                                  dtype: torch.dtype):
    """Within the block, `model`'s vision tower is a compiled and/or int8 copy in `dtype` (the cache's), where the
    settings and the job size ask for one, else on CPUs with native bf16 a copy with its 4-bit layers dequantized
    once to bf16; the training model's own (4-bit) tower is put back on exit untouched.

    Uncompiled, the dequantized copy computes exactly what the training tower computes (computing_as): the same
    cached features as encoding with the 4-bit tower (a test checks them bit for bit), so validation losses on
    cached and on live features agree, at 1.2-1.3x the 4-bit kernels' rate for a git-base-sized tower (README
    "Training step"), for 170 MB held during the filling only."""
    from models.vision_cache import git_model

    git = git_model(model)
    original = git.image_encoder
    dequantized_pays = device == "cpu" and dtype == torch.bfloat16 and has_4bit_layers(original)
    if compile_setting == "off" and precision != "int8" and not dequantized_pays:
        yield model
        return
    copy = _plain_copy(original, dtype)
    holder = torch.nn.Module()  # speed_up_vision_tower works on anything with a .git holding .image_encoder
    holder.git = torch.nn.Module()
    holder.git.image_encoder = copy
    done = speed_up_vision_tower(holder, compile_setting, precision, device, images, batch_size)
    if not done and dequantized_pays:
        computing_as(copy, original)
        done = "vision tower dequantized once to bf16 (eager, the training tower's arithmetic)"
    git.image_encoder = holder.git.image_encoder if done else original
    del copy, holder
    if done:
        logger.info("Filling the feature cache with a %s", done)
    try:
        yield model
    finally:
        git.image_encoder = original


def computing_as(copy: torch.nn.Module, original: torch.nn.Module) -> None:
    """Make `_plain_copy(original, dtype)` compute exactly what `original` (with bitsandbytes 4-bit layers) does:
    every parameter and buffer outside the 4-bit layers is the original's own tensor again (not a `dtype` copy),
    and each dequantized Linear casts its input to its weight's dtype and its output back to the input's, as
    `Linear4bit.forward` does around its dequantize-and-multiply. Only the dequantizing is done once."""
    import bitsandbytes as bnb

    for name, module in original.named_modules():
        twin = copy.get_submodule(name) if name else copy
        if isinstance(module, bnb.nn.Linear4bit):
            twin.forward = functools.partial(_linear_as_4bit, twin)
            continue
        for key, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            getattr(twin, key).data = tensor.data


def _linear_as_4bit(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.to(layer.weight.dtype), layer.weight, layer.bias).to(x.dtype)


def has_4bit_layers(module: torch.nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(child, bnb.nn.Linear4bit) for child in module.modules())


def _plain_copy(encoder: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of the tower with plain Linear layers in `dtype` (4-bit layers dequantized), in eval mode."""
    import copy

    clone = copy.deepcopy(encoder)
    dequantize_4bit_layers(clone, dtype)
    return clone.to(dtype).eval().requires_grad_(False)
