"""Train GIT's decoder on cached image features: the frozen vision tower runs once per image, not once per step.

GIT's forward takes `pixel_values` and runs `git.image_encoder` on them. While training on a cache,
`vision_from_cache(model)` puts `CachedVisionFeatures` in the image encoder's place: given a batch of
cached features shaped (batch, 1, tokens, width) as `pixel_values`, it returns them as the encoder's
output; given real images (batch, 3, height, width) it runs the real encoder, so captioning still works
inside the block. Nothing else of the model changes, and the original encoder is put back on exit, so
the saved adapter is exactly what PEFT saves for the plain model.
"""

import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.modeling_outputs import BaseModelOutput

from utils.dataset_utils import ImageItems
from utils.distributed import barrier, local_rank, local_world_size, split_for_rank
from utils.errors import UserInputError
from utils.feature_store import FeatureStore, feature_cache_bytes
from utils.progress import progress
from utils.workers import data_loader

logger = logging.getLogger(__name__)

# Cached features travel as pixel_values with one "channel"; images have three.
FEATURE_CHANNELS = 1


def causal_lm(model) -> torch.nn.Module:
    """The GitForCausalLM inside a GitForCausalLM, a PeftModel or a DDP wrapper."""
    while not hasattr(model, "git"):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
    return model


def git_model(model) -> torch.nn.Module:
    """The GitModel inside a GitForCausalLM, a PeftModel or a DDP wrapper."""
    return causal_lm(model).git


def feature_shape(model) -> tuple[int, int]:
    """(tokens, width) of the image encoder's output: (image_size / patch_size)^2 + 1 tokens."""
    vision = git_model(model).image_encoder.config
    return (vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size


def is_vision_layer(name: str) -> bool:
    """True for a layer (by full name) whose training would change the image encoder's output."""
    return ".image_encoder." in f".{name}"


def encoder_output_dtype(encoder: torch.nn.Module) -> torch.dtype:
    """The dtype of the image encoder's output, which the projection after it expects: its final LayerNorm's,
    unless the tower computes in a lower precision and hands its features on in another (`features_dtype`, set by
    models/training_speed.py::run_frozen_vision_tower_in)."""
    return getattr(encoder, "features_dtype", None) or encoder.vision_model.post_layernorm.weight.dtype


def as_pixel_values(features: torch.Tensor) -> torch.Tensor:
    """Cached features (batch, tokens, width) in the form GIT's forward accepts as pixel_values."""
    return features.unsqueeze(1)


class CachedVisionFeatures(torch.nn.Module):
    """Stands in for GIT's image encoder: passes cached features through, encodes real images."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.output_dtype = encoder_output_dtype(encoder)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs):
        if pixel_values.shape[1] == FEATURE_CHANNELS:
            return BaseModelOutput(last_hidden_state=pixel_values[:, 0].to(self.output_dtype))
        return self.encoder(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)


@contextmanager
def vision_from_cache(model):
    """Within the block, `model` accepts cached features as pixel_values (see the module docstring)."""
    git = git_model(model)
    original = git.image_encoder
    git.image_encoder = CachedVisionFeatures(original)
    try:
        yield model
    finally:
        git.image_encoder = original


@torch.no_grad()
def encode_images(model, pixel_values: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """The image encoder's output (batch, tokens, width) for preprocessed images, as GIT's forward computes it."""
    encoder = git_model(model).image_encoder
    if isinstance(encoder, CachedVisionFeatures):
        encoder = encoder.encoder
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()  # no dropout: the features a training step would see
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        features = encoder(pixel_values.to(device)).last_hidden_state
    encoder.train(was_training)
    return features


# ---------------------------------------------------------------------------
# Deciding on and filling the cache
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CachePlan:
    use: bool
    reason: str
    nbytes: int = 0


def plan_feature_cache(
    setting: str, wrapped_layers: list[str], images: int, passes: float, row_shape: tuple[int, int],
    dtype: torch.dtype, folder: Path,
) -> CachePlan:
    """Whether to cache image features (--cache_image_features auto|on|off), and why, for the log."""
    vision = [name for name in wrapped_layers if is_vision_layer(name)]
    nbytes = feature_cache_bytes(images, row_shape, dtype)
    size = f"{images} images x {row_shape[0]} x {row_shape[1]} {str(dtype).replace('torch.', '')} = {nbytes / 2**30:.2f} GiB"
    if setting == "off":
        return CachePlan(False, "--cache_image_features off")
    if vision:
        if setting == "on":
            raise UserInputError(
                f"--cache_image_features on needs a frozen vision tower, but --lora_target_modules adapts it "
                f"({', '.join(vision[:3])}{', ...' if len(vision) > 3 else ''}): its features change while training. "
                "Drop the vision names (q_proj,k_proj,v_proj,out_proj,fc1,fc2) or use --cache_image_features off."
            )
        return CachePlan(False, f"LoRA adapts the vision tower ({vision[0]}, ...), so image features change while training")
    free = shutil.disk_usage(_existing_parent(folder)).free
    if setting == "on":
        if nbytes > 0.9 * free:
            raise UserInputError(
                f"--cache_image_features on: the cache ({size}) does not fit the {free / 2**30:.1f} GiB free under "
                f"{folder.parent}. Free disk space, or use --cache_image_features off."
            )
        return CachePlan(True, f"--cache_image_features on ({size}, memory-mapped in {folder})", nbytes)
    if passes < 1.0:
        return CachePlan(False, f"each training image is seen {passes:.2f} times, so caching its features would not pay")
    if nbytes > 0.5 * free:
        return CachePlan(False, f"the cache ({size}) would take over half of the {free / 2**30:.1f} GiB free disk space")
    return CachePlan(True, f"the vision tower is frozen ({size}, memory-mapped in {folder})", nbytes)


def _existing_parent(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def fill_feature_cache(
    model, processor, store: FeatureStore, sources: list[tuple[str, object, str]], batch_size: int, num_workers: int,
    autocast_dtype: torch.dtype | None,
) -> dict[str, str]:
    """Encode every image of `sources` (key, image source, name) not yet in the store, this machine's
    process's share of them; returns the keys of unreadable images with the reason. Ranks then wait for each other."""
    missing = set(store.missing())
    todo = split_for_rank([item for item in sources if item[0] in missing], local_rank(), local_world_size())
    skipped: dict[str, str] = {}
    loader = data_loader(ImageItems(todo), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    with progress(total=len(todo), desc="Caching image features", logger=logger, disable=not todo) as bar:
        for batch in loader:
            good = [(key, image) for key, image, _ in batch if image is not None]
            skipped.update({key: reason for key, image, reason in batch if image is None})
            if good:
                pixel_values = processor(images=[image for _, image in good], return_tensors="pt").pixel_values
                store.write([key for key, _ in good], encode_images(model, pixel_values, autocast_dtype))
            bar.update(len(batch))
    barrier()
    return skipped
