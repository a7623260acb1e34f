"""Build GIT for QLoRA: a (4-bit) quantized frozen base from the hub or a folder, plus PEFT LoRA adapters."""

import ctypes
import logging
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoProcessor, BitsAndBytesConfig

from models.training_speed import (
    attention_scores_in_autocast_dtype, cast_4bit_lora_inputs_under_autocast, run_frozen_vision_tower_in,
    store_frozen_matrices_in, use_fast_dropout,
)
from utils import distributed
from utils.config import Config
from utils.errors import UserInputError
from utils.hub import check_hub_name

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matrix instructions in hardware (Cooper Lake, Sapphire Rapids, Zen 4 and newer)."""
    try:
        from bitsandbytes.functional import has_avx512bf16

        if has_avx512bf16():
            return True
    except Exception:  # noqa: BLE001 - no bitsandbytes CPU library: fall back to the kernel's flags
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def has_native_bf16(device: str) -> bool:
    """bf16 in hardware. torch.cuda.is_bf16_supported() alone also counts emulation (T4, V100); on a CPU
    without AVX-512 BF16 or AMX, bf16 is emulated and slower than fp32."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_native_bf16()


def half_dtype(device: str) -> torch.dtype:
    """The 16-bit type a device computes fast in: bf16 where native, fp16 on older GPUs, bf16 on CPUs."""
    if device == "cuda" and not has_native_bf16(device):
        return torch.float16
    return torch.bfloat16


def resolve_compute_dtype(config: Config, device: str) -> torch.dtype:
    """4-bit compute dtype. auto: bf16 where the hardware has it (GPUs as in QLoRA, and CPUs with AVX-512 BF16
    or AMX: about 3x faster than fp32 there), fp16 on older GPUs, fp32 on other CPUs. float32 is the exact path."""
    if config.bnb_4bit_compute_dtype != "auto":
        return DTYPES[config.bnb_4bit_compute_dtype]
    if device == "cuda" or has_native_bf16(device):
        return half_dtype(device)
    return torch.float32


def resolve_base_dtype(config: Config, device: str) -> torch.dtype:
    """dtype of the weights that stay unquantized (norms, embeddings, LM head) or of the whole 16/32-bit base."""
    if config.quantization_bits == 32:
        return torch.float32
    if config.quantization_bits == 16:
        return half_dtype(device)
    return resolve_compute_dtype(config, device)


def training_autocast(config: Config, device: str) -> str | None:
    """Mixed precision the Trainer runs: 'bf16', 'fp16' (autocast with loss scaling) or None (as loaded).

    prepare_model_for_kbit_training upcasts the unquantized weights to fp32, so on a GPU autocast in the
    compute dtype keeps the speed; fp16 needs the Trainer's loss scaling against underflowing gradients.
    """
    if config.quantization_bits == 32:
        return None
    dtype = resolve_base_dtype(config, device)
    if device == "cpu" and not (dtype == torch.bfloat16 and has_native_bf16(device)):
        return None  # fp16 autocast on a CPU is slow; emulated bf16 too
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)


def build_quantization_config(config: Config, device: str) -> BitsAndBytesConfig | None:
    if config.quantization_bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=resolve_compute_dtype(config, device),
        )
    if config.quantization_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def describe_precision(config: Config, device: str, training: bool = True) -> str:
    """What runs where, for the log and run_config.json: quantization, compute dtype, device (and autocast)."""
    autocast = training_autocast(config, device) if training else None
    suffix = f", training under {autocast} autocast" if autocast else ""
    if config.quantization_bits == 4:
        kind = f"4-bit {config.bnb_4bit_quant_type}{' double-quant' if config.bnb_4bit_use_double_quant else ''}"
        return f"{kind} base, compute {resolve_compute_dtype(config, device)}, on {device} (bitsandbytes){suffix}"
    if config.quantization_bits == 8:
        return f"8-bit LLM.int8 base on {device} (bitsandbytes){suffix}"
    return f"unquantized {resolve_base_dtype(config, device)} base on {device}{suffix}"


def load_processor(model_name: str, trust_remote_code: bool = False):
    check_hub_name(model_name, "--model_name", local_hint="a local GIT checkpoint folder")
    try:
        return AutoProcessor.from_pretrained(model_name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"Cannot load the processor of --model_name {model_name!r}: {str(error).splitlines()[0]} "
            "Give a hub id such as microsoft/git-base (needs the network the first time) or a local folder "
            "holding a GIT checkpoint with its processor files."
        ) from None


@contextmanager
def checkpoints_read_without_mmap():
    """Have from_pretrained read safetensors checkpoints with pread(2) instead of memory-mapping them.

    transformers maps each checkpoint file and copies one tensor at a time out of the mapping, but every page
    it touched stays resident (and counted in the process's RSS) until the file closes at the end of the load:
    for a git-base-sized fp32 checkpoint, 0.7 GB on top of the 4-bit model being built, which made the load
    training's memory peak. pread reads the same bytes into a buffer freed with each tensor, so the weights,
    and the 4-bit quantization of them, are bit-identical. transformers itself picks pread on Windows and
    MPS; it has no switch for it, so its safe_open is wrapped for the duration of the load only.
    """
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if original is None:  # another transformers layout: load as it does
        yield
        return

    def pread_open(filename, framework, device="cpu", backend="mmap", **kwargs):
        return original(filename, framework=framework, device=device, backend="pread" if backend == "mmap" else backend, **kwargs)

    modeling_utils.safe_open = pread_open
    try:
        yield
    finally:
        modeling_utils.safe_open = original


def release_freed_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim). The load frees one read buffer per
    tensor between the quantized weights it keeps; what falls below glibc's mmap threshold (4 MB, see
    git_qlora_main.py) stays in the heap, resident, until trimmed (24 MB in one git-base-sized load)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


def load_base_model(config: Config, device: str, quantize: bool = True):
    """The base GitForCausalLM, quantized as the config says (quantize=False: full precision, for merging)."""
    check_hub_name(config.model_name, "--model_name", local_hint="a local GIT checkpoint folder")
    quantization = build_quantization_config(config, device) if quantize else None
    dtype = resolve_base_dtype(config, device) if quantize else torch.float32
    try:
        with checkpoints_read_without_mmap():
            model = AutoModelForCausalLM.from_pretrained(
                config.model_name,
                quantization_config=quantization,
                dtype=dtype,
                device_map=distributed.device_map(device),  # this process's own GPU under a launcher
                trust_remote_code=config.trust_remote_code,
            )
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"Cannot load --model_name {config.model_name!r}: {str(error).splitlines()[0]} "
            "Give a hub id such as microsoft/git-base (needs the network the first time) or a local GIT checkpoint folder."
        ) from None
    release_freed_heap()
    if model.config.model_type != "git":
        logger.warning("--model_name %s is a %r model, not GIT; training may not work.", config.model_name, model.config.model_type)
    return model


def is_linear(module: torch.nn.Module) -> bool:
    # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear.
    return isinstance(module, torch.nn.Linear)


def find_target_modules(model: torch.nn.Module, names: tuple[str, ...]) -> list[str]:
    """Full names of the Linear layers whose last name part is one of `names`; unknown names are an error.

    PEFT silently ignores names that match nothing and matches non-Linear modules called `output`,
    so the exact list is resolved here and handed to PEFT.
    """
    linear_names = [name for name, module in model.named_modules() if is_linear(module)]
    found = [name for name in linear_names if name.rsplit(".", 1)[-1] in names]
    unknown = sorted(set(names) - {name.rsplit(".", 1)[-1] for name in found})
    if unknown:
        valid = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise UserInputError(
            f"--lora_target_modules names {', '.join(unknown)}, which match no Linear layer of {type(model).__name__}. "
            f"Valid names for this model: {', '.join(valid)}. For GIT the text decoder uses query,key,value,dense "
            "and the vision tower q_proj,k_proj,v_proj,out_proj,fc1,fc2; the LM head is output."
        )
    return found


def exact_names_pattern(names: list[str]) -> str:
    """A regex PEFT full-matches against module names: exactly these, no suffix matches."""
    return "|".join(re.escape(name) for name in names)


def build_lora_config(config: Config, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        # A list would be matched by suffix: "output" would also hit ...attention.output (not a Linear).
        target_modules=exact_names_pattern(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def keep_4bit_weights_unpacked(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference: the packed format cannot train.

    On CPUs with AVX-512 BF16, a Linear4bit run without grad (e.g. generation during evaluation) repacks
    its weight and the next training step crashes; see GIT_NOTES.md.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing without the input-requires-grad hook, which breaks GIT's in-place `+=`.

    Non-reentrant checkpointing does not need inputs that require grad: the LoRA weights inside each
    checkpointed layer carry the graph.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
    model.config.use_cache = False


def wrapped_lora_layers(model) -> list[str]:
    """Names (as in the base model) of the layers PEFT put LoRA on."""
    prefix = "base_model.model."
    return [name.removeprefix(prefix) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def prepare_for_training(model, config: Config):
    """Freeze the base, add LoRA to the resolved target layers, and log what was wrapped."""
    if config.quantization_bits in (4, 8):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    targets = find_target_modules(model, config.lora_target_modules)
    model = get_peft_model(model, build_lora_config(config, targets))
    keep_4bit_weights_unpacked(model)
    speed_up_training_step(model, config)
    wrapped = wrapped_lora_layers(model)
    if set(wrapped) != set(targets):
        raise RuntimeError(f"PEFT wrapped {sorted(set(wrapped) ^ set(targets))} differently from the resolved targets")
    logger.info("LoRA wraps %d layers: %s", len(wrapped), ", ".join(wrapped))
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("Trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def speed_up_training_step(model, config: Config) -> None:
    """The same step, cheaper (models/training_speed.py): fast CPU dropout masks; where the weights were loaded
    in the autocast dtype, the frozen embedding and LM-head matrices kept in it instead of fp32 copies; under
    autocast, 4-bit LoRA layers given their input in the autocast dtype (one cast, as for a plain Linear); under
    bf16 autocast, the decoder's attention scores kept in bf16; on bf16 CPUs, a frozen 4-bit vision tower computing
    in bf16 throughout."""
    device = next(model.parameters()).device.type
    dropouts = use_fast_dropout(model)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(training_autocast(config, device))
    saved = 0
    if config.quantization_bits in (4, 8) and autocast is not None and autocast == resolve_base_dtype(config, device):
        saved = store_frozen_matrices_in(model, autocast)
    cast = cast_4bit_lora_inputs_under_autocast(model) if autocast is not None else 0
    if autocast == torch.bfloat16:  # fp16's range is not fp32's: there a masked score could overflow to -inf
        attention_scores_in_autocast_dtype(model)
    # As captioning on such CPUs computes it (captions_from_dequantized_base), and what the cache filling's plain copy
    # of the tower then computes exactly, at its plain kernels' speed.
    tower = (device == "cpu" and config.quantization_bits == 4 and autocast == torch.bfloat16
             and run_frozen_vision_tower_in(model, autocast))
    logger.info("Training step: %d dropout layers with fast CPU masks; %.0f MB of frozen fp32 copies kept in %s instead; "
                "%d 4-bit LoRA layers take their input in the autocast dtype; frozen vision tower: %s",
                dropouts, saved / 2**20, str(autocast).replace("torch.", "") if saved else "-", cast,
                "bf16 throughout" if tower else "as prepared")


def captions_from_dequantized_base(config: Config, device: str) -> bool:
    """True where captioning is faster on the 4-bit weights dequantized once to bf16 than on the 4-bit kernels:
    CPUs with native bf16. Same values (the 4-bit kernels dequantize to the compute dtype on every call, and
    generation calls them once per token); about 350 MB instead of 100 MB for a git-base-sized model."""
    return (device == "cpu" and config.quantization_bits == 4 and resolve_compute_dtype(config, device) == torch.bfloat16)


def load_adapter_model(config: Config, adapter_dir: Path, device: str, for_training: bool = False):
    """The quantized base (from config.model_name) with a saved LoRA adapter; eval mode unless training."""
    base = load_base_model(config, device)
    if not for_training and captions_from_dequantized_base(config, device):
        base = base.dequantize(dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=for_training)
    if for_training:
        keep_4bit_weights_unpacked(model)
    else:
        model.eval()
    return model
