"""Loading the base model without memory-mapping the checkpoint: the same bits as transformers' own load."""

import pytest
import torch
import transformers.modeling_utils as modeling_utils
from transformers import AutoModelForCausalLM

from models.git_qlora import build_quantization_config, load_base_model, resolve_base_dtype
from utils.config import Config


@pytest.fixture
def safe_open_backends(monkeypatch):
    """The backend of every checkpoint file transformers opens (the wrapped loader passes 'pread')."""
    backends, original = [], modeling_utils.safe_open

    def recording_safe_open(*args, **kwargs):
        backends.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_open", recording_safe_open)
    return backends


def _state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8))


@pytest.mark.parametrize("compute_dtype", ["auto", "float32"])
def test_the_4bit_load_reads_with_pread_and_quantizes_bit_identically(tiny_model_dir, safe_open_backends, compute_dtype):
    config = Config(mode="train", model_name=str(tiny_model_dir), bnb_4bit_compute_dtype=compute_dtype)
    ours = _state(load_base_model(config, "cpu"))
    assert safe_open_backends == ["pread"]
    wrapped = modeling_utils.safe_open
    assert wrapped.__name__ == "recording_safe_open"  # put back after the load

    # Today's load, as transformers does it by default: the checkpoint memory-mapped.
    safe_open_backends.clear()
    reference = _state(AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), quantization_config=build_quantization_config(config, "cpu"),
        dtype=resolve_base_dtype(config, "cpu"), device_map={"": "cpu"}))
    assert safe_open_backends == ["mmap"]

    assert ours.keys() == reference.keys()
    packed = [name for name in ours if name.endswith(".weight") and ours[name].dtype == torch.uint8]
    quant_states = [name for name in ours if ".weight." in name]  # absmax, quant_map, nested_*, quant_state.*
    assert len(packed) >= 8 and len(quant_states) >= 4 * len(packed)
    differing = [name for name in ours if not _same_bits(ours[name], reference[name])]
    assert differing == []


def test_the_full_precision_load_for_merging_is_bit_identical(tiny_model_dir, safe_open_backends):
    config = Config(mode="merge_weights", model_name=str(tiny_model_dir))
    ours = _state(load_base_model(config, "cpu", quantize=False))
    reference = _state(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32))
    assert safe_open_backends == ["pread", "mmap"]
    assert ours.keys() == reference.keys()
    assert all(_same_bits(ours[name], reference[name]) for name in ours)
