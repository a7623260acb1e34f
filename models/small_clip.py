"""Build a randomly initialised CLIP checkpoint (model, byte-level tokenizer, processor) offline, for tests and speed checks."""

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Small enough to build and run in a second (build_small_clip(sizes=None) gives ViT-B/32's shape).
TINY = {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=16),
        "projection_dim": 32}


def write_byte_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer without merges: the 256 byte symbols, each also with the end-of-word mark, and BOS/EOS."""
    symbols = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(symbols + [s + "</w>" for s in symbols] + [BOS, EOS])}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder))


def build_small_clip(folder: Path, sizes: dict | None = TINY, seed: int = 0) -> Path:
    """A random CLIPModel + CLIPProcessor saved to folder, loadable with AutoModel/AutoProcessor.from_pretrained.
    sizes None: CLIPConfig's defaults (ViT-B/32 image tower, 224 px), a stand-in for openai/clip-vit-base-patch32."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_byte_tokenizer(folder)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.convert_tokens_to_ids(BOS),
           "eos_token_id": tokenizer.convert_tokens_to_ids(EOS), "pad_token_id": tokenizer.convert_tokens_to_ids(EOS)}
    sizes = sizes or {"text": {}, "vision": {}}
    config = CLIPConfig(text_config={**sizes["text"], **ids}, vision_config=sizes["vision"],
                        **({"projection_dim": sizes["projection_dim"]} if "projection_dim" in sizes else {}))
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    side = config.vision_config.image_size
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": side},
                                                                 crop_size={"height": side, "width": side}),
                              tokenizer=tokenizer)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder
