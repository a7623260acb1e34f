"""Build a small, randomly initialised GIT checkpoint (model, tokenizer, processor) offline from a caption vocabulary."""

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class SmallGitSize:
    """Sizes of a small GIT. bitsandbytes quantizes in blocks of 64, so widths are multiples of 64."""

    hidden_size: int = 128  # text decoder width
    intermediate_size: int = 256  # text decoder MLP width
    num_layers: int = 2  # text decoder layers
    num_heads: int = 4
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 256
    vision_layers: int = 2
    image_size: int = 64  # pixels; image tokens = (image_size / patch_size)^2 + 1
    patch_size: int = 16


def build_vocab(captions: list[str]) -> list[str]:
    """Sorted word pieces of the captions as BERT's basic tokenizer splits them (lowercase, punctuation apart)."""
    words = set()
    for caption in captions:
        words.update(re.findall(r"\w+|[^\w\s]", caption.lower()))
    return SPECIAL_TOKENS + sorted(words - set(SPECIAL_TOKENS))


def build_git_config(vocab_size: int, size: SmallGitSize) -> GitConfig:
    """A GitConfig for the given sizes; token ids follow the BERT vocab order of SPECIAL_TOKENS."""
    vision = {
        "hidden_size": size.vision_hidden_size,
        "intermediate_size": size.vision_intermediate_size,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.num_heads,
        "image_size": size.image_size,
        "patch_size": size.patch_size,
    }
    return GitConfig(
        vision_config=vision,
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        max_position_embeddings=128,
        pad_token_id=SPECIAL_TOKENS.index("[PAD]"),
        bos_token_id=SPECIAL_TOKENS.index("[CLS]"),
        eos_token_id=SPECIAL_TOKENS.index("[SEP]"),
    )


def build_processor(vocab: list[str], folder: Path, image_size: int) -> GitProcessor:
    """A GIT processor with a BERT tokenizer over `vocab` (written to folder/vocab.txt first)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # BertTokenizer(vocab_file=...) ignores the file in transformers 5; from_pretrained reads it.
    tokenizer = BertTokenizer.from_pretrained(str(folder), do_lower_case=True, model_max_length=512)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return GitProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_small_git(
    output_dir: Path, captions: list[str], size: SmallGitSize = SmallGitSize(), seed: int = 0
) -> Path:
    """Write a random GIT (config, safetensors weights, processor) to output_dir; returns the folder.

    It loads like a hub checkpoint with AutoProcessor / AutoModelForCausalLM.from_pretrained(output_dir).
    """
    output_dir = Path(output_dir)
    vocab = build_vocab(captions)
    processor = build_processor(vocab, output_dir, size.image_size)
    torch.manual_seed(seed)
    model = GitForCausalLM(build_git_config(len(vocab), size))
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    logger.info(
        "Built a small random GIT in %s: %d words, %.2fM parameters, sizes %s",
        output_dir, len(vocab), sum(p.numel() for p in model.parameters()) / 1e6, asdict(size),
    )
    return output_dir
