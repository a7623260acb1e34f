"""Turn image folders and caption files into (image, caption) examples and GIT training batches."""

from __future__ import annotations

import io
import logging
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps

from utils.caption_files import (  # noqa: F401 - the readers of caption files, used from here by the modes
    IMAGE_EXTENSIONS, load_captions, normalise_image_name, read_captions_file, read_folder_metadata,
)
from utils.errors import UserInputError

logger = logging.getLogger(__name__)

# Warnings list at most this many names so a 100,000-image folder does not flood the log.
MAX_NAMES_IN_WARNING = 10

# A bad image is replaced by the next loadable one; give up after this many tries.
MAX_FALLBACK_TRIES = 50

IGNORE_INDEX = -100

# Image paths already reported as unreadable in this process (one warning each).
_WARNED_BAD_IMAGES: set[str] = set()


@dataclass(frozen=True)
class Example:
    image_name: str  # path relative to the folder, posix separators, e.g. "sub/a.jpg"
    caption: str


# ---------------------------------------------------------------------------
# Finding images and captions
# ---------------------------------------------------------------------------


def find_images(folder: Path) -> list[str]:
    """Relative posix names of the images under folder, sorted; hidden entries skipped."""
    folder = Path(folder)
    names = []
    # os.walk does not descend into symlinked directories (followlinks=False), so the
    # scan cannot leave the folder or loop forever.
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_root = Path(root).relative_to(folder)
        for name in files:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            names.append((rel_root / name).as_posix())
    return sorted(names)


def caption_from_filename(image_name: str) -> str:
    """Caption guessed from a file's base name: "a_red_car-01.jpg" -> "a red car"."""
    stem = PurePosixPath(image_name.replace("\\", "/")).name
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    words = re.sub(r"[_\-]+", " ", stem)
    without_number = re.sub(r"[\s\d]*\d\s*$", "", words)
    # A name that is only a number ("0001.jpg") would give an empty caption: keep the number.
    caption = without_number if without_number.strip() else words
    return " ".join(caption.split())


def read_text(path: Path) -> str:
    """Text of a UTF-8 file (BOM optional); undecodable bytes are replaced, with a warning."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        logger.warning(
            "%s is not valid UTF-8 (first bad byte at offset %d); undecodable bytes were "
            "replaced by U+FFFD. Save the file as UTF-8 to keep every character.",
            path, err.start,
        )
        return data.decode("utf-8-sig", errors="replace")


# ---------------------------------------------------------------------------
# Pairing images with captions
# ---------------------------------------------------------------------------


def format_names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES_IN_WARNING])
    more = len(names) - MAX_NAMES_IN_WARNING
    return f"{shown} and {more} more" if more > 0 else shown


def warn_names(message: str, names: list[str], log: logging.Logger = logger) -> None:
    """One warning naming up to MAX_NAMES_IN_WARNING of the problem files, with the total count."""
    if names:
        log.warning("%s (%d): %s", message, len(names), format_names(names))


def _is_outside(name: str) -> bool:
    """True for names that would point outside the folder: absolute, drive-letter or '..'."""
    return name.startswith("/") or bool(re.match(r"^[A-Za-z]:", name)) or ".." in name.split("/")


def list_images(folder: Path, flag: str) -> list[str]:
    """Image names in folder, or UserInputError naming flag when there are none."""
    if not folder.exists():
        raise UserInputError(f"{flag} {folder} does not exist. Give the folder that holds the images.")
    if not folder.is_dir():
        raise UserInputError(f"{flag} {folder} is not a folder. Give the folder that holds the images.")
    images = find_images(folder)
    if not images:
        raise UserInputError(
            f"{flag} {folder} holds no images (looked recursively for {', '.join(IMAGE_EXTENSIONS)}, "
            "hidden files skipped). Check the path."
        )
    return images


def _match_name(name: str, image_set: set[str], folder_name: str) -> str | None:
    """The folder image a captions-file name refers to, or None."""
    if name in image_set:
        return name
    # Users often write names relative to the folder's parent ("train/a.jpg" for .../train).
    prefix = folder_name + "/"
    if name.startswith(prefix) and name[len(prefix):] in image_set:
        return name[len(prefix):]
    return None


def _match_captions(
    captions: dict[str, list[str]], images: list[str], folder: Path
) -> dict[str, list[str]]:
    """Captions keyed by folder image name; warns about names that match nothing."""
    image_set = set(images)
    matched: dict[str, list[str]] = {}
    outside, missing, unsupported, elsewhere = [], [], [], []
    for name, texts in captions.items():
        if _is_outside(name):
            outside.append(name)
            continue
        image = _match_name(name, image_set, folder.name)
        if image is not None:
            matched.setdefault(image, []).extend(texts)
        elif (folder / name).is_file():
            unsupported.append(name)
        elif "/" in name and (folder.parent / name).is_file():
            elsewhere.append(name)  # one captions file for train/ and test/, named relative to their parent
        else:
            missing.append(name)
    if elsewhere:
        logger.info("%d caption names refer to images beside %s (e.g. %s); not used here.", len(elsewhere), folder, elsewhere[0])
    warn_names("Skipped caption names that point outside the folder", outside)
    warn_names(f"Skipped caption names that are not in {folder}", missing)
    warn_names(
        f"Skipped caption names whose files are not images ({', '.join(IMAGE_EXTENSIONS)})", unsupported
    )
    return matched


def _no_match_error(
    captions: dict[str, list[str]], images: list[str], source: str, flag: str, folder: Path
) -> UserInputError:
    return UserInputError(
        f"None of the {len(captions)} image names in {source} matches an image in {flag} {folder}. "
        f"Names in the captions: {format_names(list(captions)[:5])}. "
        f"Images found: {format_names(images[:5])}. Names must be paths relative to the folder "
        "(for example `sub/a.jpg`); check for a missing or extra path prefix."
    )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # a broken symlink or a file removed during the scan
        return 0


def _drop_empty_files(folder: Path, names: list[str]) -> list[str]:
    empty = {n for n in names if _file_size(folder / n) == 0}
    warn_names("Skipped empty (zero-byte) or unreadable image files", sorted(empty))
    return [n for n in names if n not in empty]


def _captions_from_filenames(images: list[str]) -> dict[str, list[str]]:
    captions = {name: caption_from_filename(name) for name in images}
    warn_names(
        "Skipped images whose file name gives no caption", [n for n, c in captions.items() if not c]
    )
    return {name: [c] for name, c in captions.items() if c}


def collect_examples(
    folder: Path, captions_file: Path | None = None, flag: str = "--train_dir", allow_partial: bool = False
) -> list[Example]:
    """One Example per (image, caption) pair under folder, in sorted image order.

    allow_partial (--allow_partial_captions): go on when unreadable caption rows cost over 1% of the images."""
    folder = Path(folder)
    images = list_images(folder, flag)
    captions = load_captions(folder, captions_file, allow_partial)
    if captions is None:
        logger.info("No captions file or metadata in %s: using image file names as captions.", folder)
        by_image = _captions_from_filenames(images)
    else:
        source = f"--captions_file {captions_file}" if captions_file else f"the metadata file of {folder}"
        by_image = _match_captions(captions, images, folder)
        if not by_image:
            raise _no_match_error(captions, images, source, flag, folder)
        warn_names("Skipped images that have no caption", [n for n in images if n not in by_image])
    kept = _drop_empty_files(folder, [n for n in images if n in by_image])
    if not kept:
        raise UserInputError(
            f"{flag} {folder}: no non-empty image has a caption; see the warnings above."
        )
    examples = [Example(name, text) for name in kept for text in by_image[name]]
    logger.info("%s: %d images, %d captions.", folder, len(kept), len(examples))
    return examples


def split_by_image(
    examples: list[Example], ratio: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, validation) with every image's captions on one side; ratio of images held out."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"validation ratio must be in [0, 1), got {ratio}")
    names = sorted({e.image_name for e in examples})
    n_val = round(ratio * len(names))
    if ratio > 0 and len(names) >= 2:
        n_val = max(n_val, 1)
    # Never hold out every image: training needs at least one.
    n_val = min(n_val, max(len(names) - 1, 0))
    held_out = set(random.Random(seed).sample(names, n_val))
    train = [e for e in examples if e.image_name not in held_out]
    val = [e for e in examples if e.image_name in held_out]
    return train, val


# ---------------------------------------------------------------------------
# Loading images
# ---------------------------------------------------------------------------


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """RGB from 16/32-bit or float grayscale; Pillow's own convert would clip to 255 (all white)."""
    arr = np.asarray(img, dtype=np.float64)
    peak = 65535.0 if img.mode.startswith("I;16") else float(arr.max(initial=0.0))
    if peak > 255.0:
        arr = arr * (255.0 / peak)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of img; transparent pixels become white rather than black."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _high_depth_to_rgb(img)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def load_image(path: Path) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, reason) for a file that cannot be used; never raises."""
    return decode_image(path)


def load_image_bytes(data: bytes) -> tuple[Image.Image | None, str | None]:
    """load_image for encoded image bytes (a parquet cell, a WebDataset member); never raises."""
    if not data:
        return None, "empty image bytes"
    return decode_image(io.BytesIO(bytes(data)))


def decode_image(source) -> tuple[Image.Image | None, str | None]:
    """RGB image from a path or a binary file object, with EXIF orientation and the decompression-bomb guard."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.load()  # decode now so truncated files fail here, not later
                # exif_transpose returns a copy, so the result outlives the open file.
                return _to_rgb(ImageOps.exif_transpose(img)), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return None, f"too many pixels (decompression bomb guard): {err}"
    except Exception as err:  # noqa: BLE001 - Pillow decoders raise many types on corrupt input
        # Bytes have no file name: Pillow would name the buffer object ("<_io.BytesIO object at 0x...>").
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image bytes", str(err))
        return None, f"cannot read image ({type(err).__name__}: {message})"


class FolderImages:
    """Images of a folder by relative name: the image source of --train_dir / --test_dir."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self, name: str) -> tuple[Image.Image | None, str | None]:
        return load_image(self.folder / name)

    def describe(self, name: str) -> str:
        return str(self.folder / name)

    def __str__(self) -> str:
        return str(self.folder)


def as_image_source(images):
    """An object with load(name) -> (image, reason) and describe(name): a folder path becomes FolderImages."""
    return images if hasattr(images, "load") else FolderImages(Path(images))


class ImageItems(torch.utils.data.Dataset):
    """(key, image or None, reason) per (key, image source, name), decoded on access (in DataLoader workers)."""

    def __init__(self, items: list[tuple[str, object, str]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        key, source, name = self.items[index]
        image, reason = source.load(name)
        return key, image, reason


class CaptionDataset(torch.utils.data.Dataset):
    """Examples as {"image", "caption", "image_name"} dicts; images are read on access.

    `folder` is an image folder or any image source with load/describe (e.g. rows of a `datasets` split).
    """

    def __init__(self, folder, examples: list[Example]):
        self.images = as_image_source(folder)
        self.examples = list(examples)
        self._bad_names: set[str] = set()

    def __len__(self) -> int:
        return len(self.examples)

    def _load(self, image_name: str) -> Image.Image | None:
        if image_name in self._bad_names:
            return None
        image, reason = self.images.load(image_name)
        if image is None:
            self._bad_names.add(image_name)
            # Keyed by full path: train and validation folders may share file names.
            path = self.images.describe(image_name)
            if path not in _WARNED_BAD_IMAGES:
                _WARNED_BAD_IMAGES.add(path)
                logger.warning("Skipping %s: %s", path, reason)
        return image

    def __getitem__(self, i: int) -> dict | None:
        n = len(self.examples)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} examples")
        # A bad image is replaced by the next loadable example so every batch stays full.
        for step in range(min(MAX_FALLBACK_TRIES, n)):
            example = self.examples[(i + step) % n]
            image = self._load(example.image_name)
            if image is not None:
                return {"image": image, "caption": example.caption, "image_name": example.image_name}
        return None


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def find_truncated_captions(tokenizer, captions: list[str], max_length: int, chunk: int = 4096) -> list[str]:
    """The captions longer than max_length tokens (special tokens included), which training cuts short."""
    cut = []
    for start in range(0, len(captions), chunk):
        batch = captions[start : start + chunk]
        lengths = [len(ids) for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]]
        cut += [caption for caption, length in zip(batch, lengths) if length > max_length]
    return cut


def build_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels aligned with input_ids (GIT shifts them itself), padding set to -100."""
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE_INDEX
    return labels


class CaptionCollator:
    """Batches CaptionDataset items into GIT inputs: pixel_values, input_ids, attention_mask, labels."""

    def __init__(self, processor, max_length: int = 40):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, batch: list[dict | None]) -> dict[str, torch.Tensor]:
        items = [item for item in batch if item is not None]
        if not items:
            raise RuntimeError(
                "No image in this batch could be loaded; see the 'Skipping' warnings above "
                "and remove or repair the unreadable files."
            )
        pixel_values = self.processor(images=[item["image"] for item in items], return_tensors="pt").pixel_values
        return {"pixel_values": pixel_values, **encode_captions(self.processor.tokenizer, items, self.max_length)}


def encode_captions(tokenizer, items: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels of the items' captions, padded to the longest."""
    # The tokenizer's [CLS] ... [SEP] framing is kept: GIT's reference training uses it.
    encoded = tokenizer(
        [item["caption"] for item in items], padding="longest", truncation=True, max_length=max_length, return_tensors="pt",
    )
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "labels": build_labels(encoded["input_ids"], encoded["attention_mask"]),
    }


class CachedFeatureDataset(torch.utils.data.Dataset):
    """Examples whose images were encoded once: {"features", "caption", "image_name"}; no image is decoded."""

    def __init__(self, store, key_prefix: str, examples: list[Example]):
        self.store, self.key_prefix = store, key_prefix
        # Images that could not be read have no features: their examples are left out.
        self.examples = [e for e in examples if store.is_filled(key_prefix + e.image_name)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        example = self.examples[i]
        features = self.store.read(self.key_prefix + example.image_name)
        return {"features": features, "caption": example.caption, "image_name": example.image_name}


class FeatureCaptionCollator:
    """Batches CachedFeatureDataset items into GIT inputs; the features travel as pixel_values
    shaped (batch, 1, tokens, width), which models.vision_cache feeds past the image encoder."""

    def __init__(self, tokenizer, max_length: int = 40):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        features = torch.stack([item["features"] for item in items]).unsqueeze(1)
        return {"pixel_values": features, **encode_captions(self.tokenizer, items, self.max_length)}
