"""A cheaper QLoRA training step for GIT, with the same arithmetic under autocast: faster dropout masks on the CPU,
the last decoder layer over the caption rows only, no fp32 copies of frozen matrices autocast casts back anyway,
and 4-bit LoRA layers that take their input in the autocast dtype, as autocast gives a plain Linear.

Profiled on a git-base-sized model (batch 4, cached image features, bf16 autocast, 2-core CPU), a step spent
about 15% drawing GIT's dropout masks (torch's CPU `bernoulli_` draws one 32-bit number per element), and
every decoder layer ran over all 197 image positions although the loss only reads the caption positions of
the last one; see README "Training step".
"""

from __future__ import annotations

import functools
import math
import weakref
from contextlib import contextmanager

import torch

from models.vision_cache import causal_lm, encoder_output_dtype, git_model

MASK_LEVELS = 1 << 16  # a mask element is one 16-bit slice of a 64-bit random number


class FastDropout(torch.nn.Dropout):
    """nn.Dropout whose CPU masks come four to a 64-bit draw of torch's generator (so torch.manual_seed, and
    the Trainer's seed, still decide them), about 3x faster than `F.dropout` on the CPU.

    An element is kept when its 16-bit slice is at or above a threshold: with probability 1 - q, where
    q = round(p * 65536) / 65536 is p to within 8e-6, and kept elements are scaled by 1 / (1 - q), so the
    expectation is exactly the input's, as with nn.Dropout. Other devices use `F.dropout`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        dropped = round(self.p * MASK_LEVELS)
        if dropped >= MASK_LEVELS:
            return x * 0
        words = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-(2 ** 63), None)
        bits = words.view(torch.int16)[: x.numel()].view(x.shape)
        keep = bits >= dropped - MASK_LEVELS // 2
        # Select, then scale in place: the same values as where(keep, x * scale, 0), one fresh buffer fewer (2x here).
        return torch.where(keep, x, 0).mul_(MASK_LEVELS / (MASK_LEVELS - dropped))


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Put a FastDropout (same p, same training flag) in place of every nn.Dropout with p > 0; returns how many.
    Dropout holds no weights, so state dicts and saved adapters are unchanged."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                replaced += 1
    return replaced


def store_frozen_matrices_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Keep the word embeddings and the LM head, frozen, in `dtype` again; returns the bytes saved.

    prepare_model_for_kbit_training upcasts every unquantized weight to fp32. For these two 30,522 x 768
    matrices (94 MB each in fp32, git-base) that only costs memory when the model was loaded in `dtype` and
    trains under `dtype` autocast: their values are `dtype` values, and autocast casts the LM head's weight back
    to `dtype` at every step (a 47 MB copy). The embeddings' rows are cast up to fp32 as they are looked up, so
    they are the rows they were; the LM head computes in `dtype`, as it does under autocast and as --inference
    runs it on such machines, and returns fp32 logits. Only call it in that case."""
    saved = 0
    embeddings = git_model(model).embeddings.word_embeddings
    head = causal_lm(model).output
    for module in (embeddings, head):
        for weight in (module.weight, getattr(module, "bias", None)):
            if weight is None or weight.requires_grad or weight.dtype != torch.float32:
                continue
            saved += weight.numel() * (weight.element_size() - torch.empty((), dtype=dtype).element_size())
            weight.data = weight.data.to(dtype)
    if embeddings.weight.dtype == dtype:
        embeddings.register_forward_hook(_output_as_fp32)
    if head.weight.dtype == dtype:  # its input is the fp32 residual stream (the fp32 final LayerNorm)
        head.register_forward_pre_hook(_input_in_weight_dtype)
        head.register_forward_hook(_output_as_fp32)
    return saved


def _output_as_fp32(module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def _input_in_weight_dtype(module, inputs):
    return (inputs[0].to(module.weight.dtype), *inputs[1:])


def attention_scores_in_autocast_dtype(model: torch.nn.Module) -> None:
    """Under autocast, hand GIT's decoder its additive attention mask in the autocast dtype, so each layer's
    scores, softmax and attention dropout stay in it instead of being promoted to fp32 by the fp32 mask.

    The scores come out of a bf16 product already; the mask holds 0 and a large negative number, and 0 adds
    exactly, so the masked scores are the same numbers. The softmax still sums in fp32 inside the kernel and
    returns bf16, which the product with the values then reads, as it read the fp32 probabilities cast to bf16
    (the dropout's 1/(1-p) scaling now rounds once more). Profiled on a git-base-sized step (4 x 12 x 206 x 206
    scores per layer), the promoted fp32 chain and its backward were about 8% of the step.
    """
    git_model(model).encoder.register_forward_pre_hook(_mask_in_autocast_dtype, with_kwargs=True)


def _mask_in_autocast_dtype(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if mask is None or not mask.dtype.is_floating_point or not torch.is_autocast_enabled(mask.device.type):
        return None
    dtype = torch.get_autocast_dtype(mask.device.type)
    if mask.dtype == dtype:
        return None
    # The fp32 minimum is beyond bf16's range: cast as is it would be -inf, and a row masked everywhere NaN.
    kwargs["attention_mask"] = mask.clamp(min=torch.finfo(dtype).min).to(dtype)
    return args, kwargs


def run_frozen_vision_tower_in(model: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Make a frozen 4-bit vision tower compute in `dtype` throughout, as the dequantized bf16 tower that captions
    does (models/git_qlora.py::captions_from_dequantized_base); returns whether it was done (not for a tower with
    trainable weights, e.g. vision LoRA, whose backward pass runs through it).

    prepare_model_for_kbit_training upcasts every unquantized weight to fp32, so the tower's LayerNorms,
    embeddings, residual stream and GELUs ran in fp32 around 4-bit products that compute in `dtype` and cast their
    results back up. Here its floating-point tensors go back to `dtype` (the values loaded, when the base was loaded
    in it), pixel values are cast to it on the way in and the features to the dtype GIT's projection after the
    tower expects on the way out. Then the tower gives the same features under autocast and without it, and the
    plain copy that fills the feature cache (models/caption_speed.py::fast_vision_tower_for_filling) computes
    exactly what it does while running only plain `dtype` kernels: a git-base-sized tower at 1.3x the rate of the
    fp32-LayerNorm one (README "Training step").
    """
    encoder = git_model(model).image_encoder
    if any(p.requires_grad for p in encoder.parameters()):
        return False
    features_dtype = encoder_output_dtype(encoder)
    for tensor in list(encoder.parameters()) + list(encoder.buffers()):
        if tensor.dtype.is_floating_point and tensor.dtype != dtype:
            tensor.data = tensor.data.to(dtype)
    encoder.features_dtype = features_dtype  # read by encoder_output_dtype (cached features are handed on in it)
    encoder.register_forward_pre_hook(functools.partial(_pixels_in, dtype), with_kwargs=True)
    encoder.register_forward_hook(_features_in_features_dtype)
    return True


def _pixels_in(dtype: torch.dtype, module, args, kwargs):
    if args:
        return (args[0].to(dtype), *args[1:]), kwargs
    return args, {**kwargs, "pixel_values": kwargs["pixel_values"].to(dtype)}


def _features_in_features_dtype(module, args, output):
    output.last_hidden_state = output.last_hidden_state.to(module.features_dtype)
    return output


def cast_4bit_lora_inputs_under_autocast(model: torch.nn.Module) -> int:
    """Hand every LoRA layer over a bitsandbytes 4-bit Linear its input already in the autocast dtype, when that is
    the layer's compute dtype; returns how many layers were hooked. Outside autocast nothing changes.

    Under autocast a plain nn.Linear casts its fp32 input to bf16 and returns bf16. A 4-bit Linear does not take
    part in autocast: it casts the input to its compute dtype itself and casts the result back to the input's
    dtype, PEFT then clones that fp32 result, and autocast casts the same input to bf16 once more for lora_A.
    Profiled on a git-base-sized step (cached features, batch 4, bf16), those copies were 21% of the step, more
    than the matrix products. With the input cast once before the layer (once for the query, key and value that
    read the same hidden states) and PEFT's fp32 round trip for lora_A turned off, the 4-bit product, its weight
    and lora_A see the same bf16 values as before and the layer returns bf16, as a plain Linear under autocast
    does; what changes is where the sums round (the layer's output and its input gradient are bf16, not fp32).
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    hooked = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit):
            module.register_forward_pre_hook(_input_in_autocast_dtype)
            hooked += 1
    return hooked


def _input_in_autocast_dtype(module, args):
    x = args[0]
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    # PEFT casts lora_A's input to lora_A's fp32 weight unless it sees autocast, and it looks at CUDA's only; on
    # the CPU under autocast, lora_A then casts that fp32 copy back: a round trip with the same values, two copies.
    module.cast_input_dtype_enabled = not autocast
    if x.dtype != torch.float32 or not autocast:
        return None
    dtype = torch.get_autocast_dtype(device)
    if dtype != module.get_base_layer().compute_dtype:
        return None
    return (_SharedCast.apply(x, _cast_of(x, dtype)), *args[1:])


_last_cast: list = [None]  # (weak reference to the input, its version counter, dtype, its cast)


def _cast_of(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, computed once for consecutive layers given the same unchanged tensor (a decoder layer's query,
    key and value all read the same hidden states): one copy made and held for backward instead of three."""
    last = _last_cast[0]
    if last is not None and last[0]() is x and last[1] == x._version and last[2] == dtype:
        return last[3]
    cast = x.detach().to(dtype)
    _last_cast[0] = (weakref.ref(x), x._version, dtype, cast)
    return cast


class _SharedCast(torch.autograd.Function):
    """x.to(dtype) for one layer, its values taken from a cast shared with the other layers reading x. Each layer
    keeps its own backward node, which casts its gradient back to fp32 as x.to(dtype)'s does, so the gradients
    reach x and are summed in fp32 exactly as with one cast per layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.input_dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.input_dtype), None


@contextmanager
def last_layer_over_caption_rows(model: torch.nn.Module, rows: int):
    """Within the block, GIT's last decoder layer computes only the last `rows` positions (the caption's) and
    returns them alone; for a forward called with logits_to_keep=rows, whose logits and loss come from those
    positions only, the result is the same.

    The image positions' queries, attention, output projection and MLP in the last layer feed nothing that
    is read then (their keys and values, which the caption attends to, are still computed): 1/6 of a
    git-base step's decoder work. Not for anything that reads the last hidden states of all positions.
    """
    layer = git_model(model).encoder.layer[-1]
    if getattr(layer, "gradient_checkpointing", False):  # backward recomputes the layer after the block: keep it whole
        yield
        return
    layer.forward = lambda hidden_states, attention_mask=None, cache=None, **kwargs: _caption_rows_forward(
        layer, rows, hidden_states, attention_mask, cache)
    try:
        yield
    finally:
        del layer.forward


def _caption_rows_forward(layer, rows: int, hidden_states: torch.Tensor, attention_mask, cache) -> torch.Tensor:
    """GitLayer.forward (transformers 5) for the last `rows` query positions; keys and values over all."""
    if cache is not None:
        raise RuntimeError("last_layer_over_caption_rows is for training forwards, which use no cache")
    attention = layer.attention.self
    batch, length = hidden_states.shape[:2]
    caption = hidden_states[:, length - rows:]
    heads = (batch, -1, attention.num_attention_heads, attention.attention_head_size)
    query = attention.query(caption).view(heads).transpose(1, 2)
    key = attention.key(hidden_states).view(heads).transpose(1, 2)
    value = attention.value(hidden_states).view(heads).transpose(1, 2)
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(attention.attention_head_size)
    if attention_mask is not None:
        scores = scores + attention_mask[..., length - rows:, :]
    probs = attention.dropout(torch.nn.functional.softmax(scores, dim=-1))
    context = torch.matmul(probs, value).permute(0, 2, 1, 3).contiguous().view(batch, rows, attention.all_head_size)
    attention_output = layer.attention.output(context, caption)
    return layer.feed_forward_chunk(attention_output)
