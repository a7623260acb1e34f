"""Build a small, randomly initialised GIT checkpoint (model, tokenizer, processor) offline from a caption vocabulary, and pretrain it."""

import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class SmallGitSize:
    """Sizes of a small GIT, and how it starts. bitsandbytes quantizes in blocks of 64, so widths are multiples of 64."""

    hidden_size: int = 128  # text decoder width
    intermediate_size: int = 256  # text decoder MLP width
    num_layers: int = 2  # text decoder layers
    num_heads: int = 4
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 256
    vision_layers: int = 2
    image_size: int = 64  # pixels; image tokens = (image_size / patch_size)^2 + 1
    patch_size: int = 16
    max_position_embeddings: int = 128  # longest caption in tokens
    dropout: float = 0.1  # the text decoder's hidden and attention dropout (GitConfig's default; the vision tower has none)
    initializer_range: float = 0.02  # std of the random weights (GitConfig's default)


# git-base's shape (GitConfig() defaults): a fair stand-in for speed and memory measurements.
GIT_BASE_SIZE = SmallGitSize(
    hidden_size=768, intermediate_size=3072, num_layers=6, num_heads=12, vision_hidden_size=768,
    vision_intermediate_size=3072, vision_layers=12, image_size=224, patch_size=16, max_position_embeddings=1024,
)
GIT_BASE_VOCAB = 30522


def build_vocab(captions: list[str], vocab_size: int | None = None) -> list[str]:
    """Sorted word pieces of the captions as BERT's basic tokenizer splits them (lowercase, punctuation apart).

    vocab_size pads the list with unused tokens, e.g. to BERT's 30522 for a git-base-sized benchmark model.
    """
    words = set()
    for caption in captions:
        words.update(re.findall(r"\w+|[^\w\s]", caption.lower()))
    vocab = SPECIAL_TOKENS + sorted(words - set(SPECIAL_TOKENS))
    return vocab + [f"[unused{i}]" for i in range(max(0, (vocab_size or 0) - len(vocab)))]


def build_git_config(vocab: list[str], size: SmallGitSize) -> GitConfig:
    """A GitConfig for the given sizes; the special token ids are where BERT's tokens sit in vocab."""
    vision = {
        "hidden_size": size.vision_hidden_size,
        "intermediate_size": size.vision_intermediate_size,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.num_heads,
        "image_size": size.image_size,
        "patch_size": size.patch_size,
        "initializer_range": size.initializer_range,
    }
    return GitConfig(
        vision_config=vision,
        vocab_size=len(vocab),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        max_position_embeddings=size.max_position_embeddings,
        hidden_dropout_prob=size.dropout,
        attention_probs_dropout_prob=size.dropout,
        initializer_range=size.initializer_range,
        pad_token_id=vocab.index("[PAD]"),
        bos_token_id=vocab.index("[CLS]"),
        eos_token_id=vocab.index("[SEP]"),
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
    output_dir: Path, captions: list[str], size: SmallGitSize = SmallGitSize(), seed: int = 0,
    vocab_size: int | None = None, vocab_file: Path | None = None,
) -> Path:
    """Write a random GIT (config, safetensors weights, processor) to output_dir; returns the folder.

    It loads like a hub checkpoint with AutoProcessor / AutoModelForCausalLM.from_pretrained(output_dir).
    vocab_file: use that WordPiece vocabulary (e.g. bert-base-uncased's, as microsoft/git-base does)
    instead of one built from the captions.
    """
    output_dir = Path(output_dir)
    if vocab_file is not None:
        vocab = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    else:
        vocab = build_vocab(captions, vocab_size)
    processor = build_processor(vocab, output_dir, size.image_size)
    torch.manual_seed(seed)
    model = GitForCausalLM(build_git_config(vocab, size))
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)
    logger.info(
        "Built a small random GIT in %s: %d words, %.2fM parameters, sizes %s",
        output_dir, len(vocab), sum(p.numel() for p in model.parameters()) / 1e6, asdict(size),
    )
    return output_dir


@dataclass(frozen=True)
class PretrainSettings:
    """Full fine-tuning (fp32) of a fresh small GIT on captioned pictures, so it starts out describing images."""

    steps: int = 3000  # optimizer steps; from GitConfig's start the 64 px GIT names colours after ~300, positions ~2,000 (the demo starts it so that 600 do)
    batch_size: int = 32
    learning_rate: float = 1e-3  # peak, after a linear warm-up, then cosine decay to 0 (2e-3 was worse)
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_length: int = 16  # caption tokens, [CLS] and [SEP] included
    sincos_positions: bool = True  # start the vision tower from 2-D sine-cosine positions (for a fresh model)
    position_temperature: float = 10000.0  # their longest wavelength; 10000 (MAE's) suits large grids
    seed: int = 0


def encode_examples(processor, examples: list, max_length: int, chunk: int = 256) -> dict[str, torch.Tensor]:
    """Pixel values, token ids, attention masks and labels of (image, caption) pairs, computed once."""
    from utils.dataset_utils import build_labels

    pixels = [
        processor(images=[image for image, _ in examples[i : i + chunk]], return_tensors="pt").pixel_values
        for i in range(0, len(examples), chunk)
    ]
    text = processor.tokenizer(
        [caption for _, caption in examples], padding="longest", truncation=True, max_length=max_length,
        return_tensors="pt",
    )
    return {
        "pixel_values": torch.cat(pixels),
        "input_ids": text.input_ids,
        "attention_mask": text.attention_mask,
        "labels": build_labels(text.input_ids, text.attention_mask),
    }


def _lr_factor(step: int, settings: PretrainSettings) -> float:
    """Linear warm-up, then cosine decay to 0 at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _fit(model, data: dict[str, torch.Tensor], settings: PretrainSettings) -> list[float]:
    """AdamW steps on random batches of the encoded set; returns the loss of every step."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, settings))
    size, losses = len(data["input_ids"]), []
    with tqdm(range(settings.steps), desc="Pretraining base GIT", unit="step") as bar:
        for step in bar:
            index = torch.randint(size, (settings.batch_size,), generator=generator)
            loss = model(**{key: value[index] for key, value in data.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    return losses


def pretrain_small_git(folder: Path, examples: list, settings: PretrainSettings = PretrainSettings()) -> dict:
    """Train every weight of the GIT checkpoint in folder on (PIL image, caption) pairs; saves it back in place.

    A plain fp32 loop rather than the Trainer: the whole set is encoded once and sits in memory,
    which keeps a step of this small model at about 30 ms on two CPU cores. Returns the losses at start and end.
    """
    from transformers import AutoModelForCausalLM, AutoProcessor

    folder = Path(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
    if settings.sincos_positions:
        init_vision_positions(model, settings.position_temperature)
    data = {key: value.to(device) for key, value in encode_examples(processor, examples, settings.max_length).items()}
    start = time.perf_counter()
    losses = _fit(model, data, settings)
    model.eval().save_pretrained(folder, safe_serialization=True)
    window = min(50, len(losses))
    stats = {
        "steps": settings.steps, "examples": len(examples), "seconds": round(time.perf_counter() - start, 2),
        "first_loss": sum(losses[:window]) / window, "final_loss": sum(losses[-window:]) / window,
    }
    logger.info("Pretrained %s on %d pictures: loss %.3f -> %.3f in %d steps (%.0f s)", folder, len(examples),
                stats["first_loss"], stats["final_loss"], settings.steps, stats["seconds"])
    return stats


def sincos_position_table(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine-cosine position codes (as in MAE) for a grid x grid of patches, one row per patch, row-major.

    Frequencies run from 1 down to 1/temperature; with MAE's 10000 most of them hardly change across a small
    grid (4 x 4), so a few-step grid wants a small temperature."""
    if dim % 4:
        raise ValueError(f"the embedding width must be a multiple of 4 for 2-D sine-cosine codes; got {dim}")
    frequencies = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coordinate in (ys.flatten(), xs.flatten()):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def init_vision_positions(model, temperature: float = 10000.0) -> None:
    """Give the vision tower 2-D sine-cosine patch positions in place of its 0.02-scale random ones.

    The random ones are ~40x weaker than the patch contents, so a from-scratch GIT takes thousands of
    steps to learn where things are; with these it knows from the first step. They stay trainable.
    """
    embeddings = model.git.image_encoder.vision_model.embeddings
    grid = embeddings.image_size // embeddings.patch_size
    with torch.no_grad():
        embeddings.position_embedding.weight[0].zero_()  # the class token has no place
        embeddings.position_embedding.weight[1:] = sincos_position_table(grid, embeddings.embed_dim, temperature)
