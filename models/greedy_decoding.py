"""Greedy captioning for GIT without `generate`'s per-token overhead: a key/value cache allocated once.

At batch 8 on a git-base-sized model, `generate` spends about half of a caption on the 20 one-token steps
(32-45 ms each on a 2-core CPU), and under half of that is the decoder's matrix products: the rest is its
DynamicCache concatenating (and transposing) every layer's keys and values at every step, the causal-mask
builder and the logits processors. `greedy_caption_ids` runs the model's own modules in the same order and
dtype (so a PEFT adapter, a dequantized 4-bit base, a compiled or cached vision tower and autocast apply as
they do in `generate`) with each layer's keys, transposed, and values written into buffers sized for the whole
caption, and returns what greedy `generate` returns: the BOS token, then one token per step, padding after a
row's EOS. Every step has the same shapes (the cache's full length, the unwritten part masked out), so
models/caption_speed.py can compile `Prefill` and `DecodeStep` once for a batch size and caption length.

`generate` stays in charge of anything else (beam search, sampling, a generation config that asks for a
logits processor, video input): `can_decode_greedily` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from models.vision_cache import causal_lm

# Generation settings that do not change greedy decoding's arithmetic; any other non-default one
# (repetition_penalty, bad_words_ids, min_new_tokens, ...) leaves the captioning to `generate`.
NEUTRAL_GENERATION_KEYS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "use_cache", "max_length",
    "output_attentions", "output_hidden_states", "return_dict_in_generate", "transformers_version", "num_beams",
    "do_sample", "early_stopping", "_from_model_config",
}

# Where a model keeps its faster (compiled) prefill and step, set by models/caption_speed.py: a plain attribute of
# the GitForCausalLM (not a submodule, so never in its state_dict), so it goes with the model.
FAST_DECODING_ATTRIBUTE = "_git_qlora_fast_decoding"


@dataclass(frozen=True)
class FastDecoding:
    """Stand-ins for Prefill(lm) and DecodeStep(lm), made for one batch size and cache capacity."""

    batch_size: int
    capacity: int
    prefill: Callable
    step: Callable


def can_decode_greedily(model, pixel_values: torch.Tensor, num_beams: int) -> bool:
    """True when greedy_caption_ids gives what model.generate(..., do_sample=False) would."""
    config = causal_lm(model).generation_config
    settings = {key for key, value in config.to_diff_dict().items() if value is not None}
    neutral = settings <= NEUTRAL_GENERATION_KEYS and not config.do_sample and (config.num_beams or 1) == 1
    return num_beams == 1 and neutral and pixel_values.ndim == 4 and config.bos_token_id is not None


def set_fast_decoding(model, fast: FastDecoding) -> None:
    setattr(causal_lm(model), FAST_DECODING_ATTRIBUTE, fast)


def fast_decoding(model) -> FastDecoding | None:
    return getattr(causal_lm(model), FAST_DECODING_ATTRIBUTE, None)


class KeyValueCache:
    """Each decoder layer's keys, transposed (batch, heads, head size, capacity), and values (batch, heads,
    capacity, head size); zeros where nothing is written yet, so a masked-out position adds exactly nothing."""

    def __init__(self, layers: int, batch: int, heads: int, head_size: int, capacity: int, dtype, device):
        self.keys = [torch.zeros(batch, heads, head_size, capacity, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(batch, heads, capacity, head_size, dtype=dtype, device=device) for _ in range(layers)]


def _heads(attention, hidden: torch.Tensor, linear) -> torch.Tensor:
    return linear(hidden).view(*hidden.shape[:-1], -1, attention.attention_head_size).transpose(1, 2)


def _attend(attention, query, keys_t, values, mask) -> torch.Tensor:
    """GitSelfAttention's arithmetic (transformers 5.24): scaled scores, additive mask, softmax, weighted values."""
    scores = torch.matmul(query, keys_t) / math.sqrt(attention.attention_head_size) + mask
    context = torch.matmul(torch.nn.functional.softmax(scores, dim=-1), values).permute(0, 2, 1, 3).contiguous()
    return context.view(*context.shape[:-2], attention.all_head_size)


def _layer(layer, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of a GitLayer after self-attention: output projection + norm, then the MLP + norm."""
    attended = layer.attention.output(attended, hidden)
    return layer.output(layer.intermediate(attended), attended)


class Prefill(torch.nn.Module):
    """The decoder over the image tokens and BOS (the last token): image tokens see each other, not BOS; BOS
    sees everything. Fills the cache's first positions; returns the first generated tokens (greedy).

    In the last layer only the keys and values of the image tokens are read later (by BOS now, by every
    generated token after), so their queries, attention, output projection and MLP are skipped there, as
    `generate` would compute and then discard them: 1/7 of the prefill's products for GIT's 6 decoder layers.
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, hidden: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        tokens = hidden.shape[1]
        mask = torch.zeros(tokens, tokens, dtype=hidden.dtype, device=hidden.device)
        mask[:-1, -1] = torch.finfo(hidden.dtype).min
        layers = self.lm.git.encoder.layer
        for index, layer in enumerate(layers):
            attention = layer.attention.self
            keys[index][..., :tokens] = _heads(attention, hidden, attention.key).transpose(-1, -2)
            values[index][:, :, :tokens] = _heads(attention, hidden, attention.value)
            if index == len(layers) - 1:  # from here on only BOS's row is read
                hidden, mask = hidden[:, -1:], mask[-1:]
            query = _heads(attention, hidden, attention.query)
            attended = _attend(attention, query, keys[index][..., :tokens], values[index][:, :, :tokens], mask)
            hidden = _layer(layer, hidden, attended)
        return next_tokens(self.lm, hidden)


class DecodeStep(torch.nn.Module):
    """One new token per row: its embedding at text position `position`, keys and values written at cache slot
    `slot`, attention over slots 0..slot. Returns the next tokens (greedy). Same shapes at every step."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens, position, slot, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        git = self.lm.git
        hidden = git.embeddings(input_ids=tokens, position_ids=position.expand_as(tokens))
        seen = torch.arange(keys[0].shape[-1], device=tokens.device) <= slot
        mask = torch.where(seen, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)
        for index, layer in enumerate(git.encoder.layer):
            attention = layer.attention.self
            keys[index].index_copy_(3, slot, _heads(attention, hidden, attention.key).transpose(-1, -2))
            values[index].index_copy_(2, slot, _heads(attention, hidden, attention.value))
            query = _heads(attention, hidden, attention.query)
            hidden = _layer(layer, hidden, _attend(attention, query, keys[index], values[index], mask))
        return next_tokens(self.lm, hidden)


def next_tokens(lm, hidden: torch.Tensor) -> torch.Tensor:
    """Greedy choice from the last position, on fp32 logits as `generate` takes them."""
    return lm.output(hidden[:, -1]).float().argmax(dim=-1)


@torch.no_grad()
def greedy_caption_ids(model, pixel_values: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Token ids (batch, 1 + steps) as greedy `generate` returns them, for preprocessed images (or cached
    features the model's image encoder accepts as pixel_values)."""
    lm = causal_lm(model)
    git, config, device = lm.git, lm.generation_config, pixel_values.device
    count = pixel_values.shape[0]
    fast = fast_decoding(lm)
    if fast is not None and count < fast.batch_size:  # the compiled graphs have one batch size: pad the last batch
        pixel_values = torch.cat([pixel_values, pixel_values.new_zeros((fast.batch_size - count, *pixel_values.shape[1:]))])
    batch = pixel_values.shape[0]
    eos = torch.tensor([t for t in (config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
                        if t is not None], dtype=torch.long, device=device)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    tokens = torch.full((batch, 1), config.bos_token_id, dtype=torch.long, device=device)

    visual = git.visual_projection(git.image_encoder(pixel_values).last_hidden_state)
    hidden = torch.cat((visual, git.embeddings(input_ids=tokens)), dim=1)
    attention = git.encoder.layer[0].attention.self
    capacity = hidden.shape[1] + max_new_tokens - 1  # the last token chosen is never fed back
    cache = KeyValueCache(len(git.encoder.layer), batch, attention.num_attention_heads, attention.attention_head_size,
                          capacity, hidden.dtype, device)
    if fast is None or (fast.batch_size, fast.capacity) != (batch, capacity):
        fast = FastDecoding(batch, capacity, Prefill(lm), DecodeStep(lm))
    chosen = fast.prefill(hidden, cache.keys, cache.values)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    for index in range(max_new_tokens):
        chosen = torch.where(unfinished, chosen, pad)
        tokens = torch.cat((tokens, chosen[:, None]), dim=1)
        unfinished &= ~torch.isin(chosen, eos)
        if index + 1 == max_new_tokens or not unfinished[:count].any():
            break
        position = torch.tensor([index + 1], device=device)
        slot = torch.tensor([visual.shape[1] + 1 + index], device=device)
        chosen = fast.step(chosen[:, None], position, slot, cache.keys, cache.values)
    return tokens[:count]
