"""Read captioned images with Hugging Face `datasets`: hub ids, parquet/arrow/JSONL files and WebDataset shards."""

from __future__ import annotations

import dataclasses
import glob
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.caption_files import ALLOWED_LOSS
from utils.dataset_utils import (
    MAX_NAMES_IN_WARNING, Example, format_names, load_image, load_image_bytes, split_by_image, warn_names,
)
from utils.distributed import rank, world_size
from utils.errors import UserInputError
from utils.hub import check_hub_name

logger = logging.getLogger(__name__)

# Column names tried in order when --image_column / --caption_column are not given.
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "file_name", "image_path", "filename", "path")
CAPTION_COLUMNS = ("text", "caption", "captions", "txt", "sentences", "json")
# Inside a struct caption cell (a WebDataset .json, COCO's sentences): the key that holds the text.
CAPTION_KEYS = ("caption", "text", "captions", "raw", "sentence", "sentences")
# Splits used for validation, --eval and --inference when --eval_split is not given.
EVAL_SPLITS = ("validation", "valid", "val", "test")
# load_dataset builder per file extension (a folder takes the extension most of its data files have).
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tar": "webdataset"}
GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class DatasetSpec:
    """What --dataset and its companion flags ask for."""

    name: str
    config_name: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    id_column: str | None = None
    streaming: bool = False
    shuffle_buffer: int = 1000
    split_ratio: float = 0.1
    seed: int = 42
    allow_partial_captions: bool = False

    @classmethod
    def from_config(cls, config) -> "DatasetSpec":
        return cls(
            name=str(config.dataset), config_name=config.dataset_config, train_split=config.train_split,
            eval_split=config.eval_split, image_column=config.image_column, caption_column=config.caption_column,
            id_column=config.id_column, streaming=config.streaming, shuffle_buffer=config.shuffle_buffer,
            split_ratio=config.split_ratio, seed=config.seed, allow_partial_captions=config.allow_partial_captions,
        )

    @classmethod
    def from_run_settings(cls, run_settings: dict) -> "DatasetSpec":
        """The dataset a --dataset run trained on, from its run_config.json (not streamed: read as a table)."""
        return cls(
            name=run_settings["dataset"], config_name=run_settings.get("dataset_config"),
            train_split=run_settings.get("train_split") or "train", eval_split=run_settings.get("eval_split"),
            image_column=run_settings.get("image_column"), caption_column=run_settings.get("caption_column"),
            id_column=run_settings.get("id_column"), split_ratio=run_settings.get("split_ratio", 0.1),
            seed=run_settings.get("seed", 42),
        )


@dataclass(frozen=True)
class Columns:
    image: str
    caption: str | None  # None: --inference on images without captions
    id: str | None  # None: a row id "<split>/000123"


# ---------------------------------------------------------------------------
# Opening a source
# ---------------------------------------------------------------------------


def _builder_for(files: list[str], name: str) -> str:
    counts: dict[str, int] = {}
    for f in files:
        builder = BUILDERS.get(Path(f).suffix.lower())
        if builder:
            counts[builder] = counts.get(builder, 0) + 1
    if not counts:
        raise UserInputError(
            f"--dataset {name}: no parquet, arrow, JSONL/JSON, CSV or WebDataset .tar file there "
            f"(found e.g. {', '.join(Path(f).name for f in files[:3]) or 'nothing'}). For a folder of images "
            "with a captions file use --train_dir / --test_dir instead."
        )
    # Ties go to the image-carrying format: img2dataset writes one metadata .parquet per .tar shard.
    priority = ("webdataset", "parquet", "arrow", "json", "csv")
    return max(counts, key=lambda b: (counts[b], -priority.index(b)))


def _local_load_args(name: str) -> tuple[str, dict, list[Path]] | None:
    """(builder, load_dataset kwargs, folders that relative image paths are resolved in), or None for a hub id.
    The builder "disk" means a folder written by save_to_disk."""
    path = Path(name).expanduser()
    if any(c in name for c in GLOB_CHARS):
        files = sorted(f for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
        if not files:
            raise UserInputError(f"--dataset {name} matches no file. Check the pattern (quote it so the shell leaves it alone).")
        bases = sorted({Path(f).parent for f in files})
        return _builder_for(files, name), {"data_files": {"train": files}}, bases
    if path.is_file():
        return _builder_for([str(path)], name), {"data_files": {"train": [str(path)]}}, [path.parent]
    if path.suffix.lower() in BUILDERS and not path.exists():
        raise UserInputError(f"--dataset {name}: no such file. Check the path.")
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "disk", {}, [path]
        files = [str(p) for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        data = [f for f in files if Path(f).suffix.lower() in BUILDERS and Path(f).name != "metadata.jsonl"]
        if not data and any(Path(f).name in ("metadata.jsonl", "metadata.csv") for f in files):
            return "imagefolder", {"data_dir": str(path)}, [path]  # the imagefolder layout: images + metadata
        builder = _builder_for(data, name)
        return builder, {"data_files": _split_files(path, builder)}, sorted({Path(f).parent for f in data} | {path})
    return None


def _split_files(folder: Path, builder: str) -> dict[str, list[str]]:
    """Files of one format per split, named as `datasets` names them (train-*.parquet, test/*.jsonl, ...);
    the other files (img2dataset's metadata .parquet and _stats.json beside its shards) are left out."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    extensions = [ext for ext, b in BUILDERS.items() if b == builder]
    found = DataFilesDict.from_patterns(get_data_patterns(str(folder)), str(folder), allowed_extensions=extensions)
    return {str(split): list(files) for split, files in found.items() if files}


def _load(spec: DatasetSpec):
    """DatasetDict / IterableDatasetDict of every split, and the folders relative image paths live in."""
    import datasets

    local = _local_load_args(spec.name)
    if local is None:
        check_hub_name(spec.name, "--dataset", repo_type="dataset", local_hint="a local file, folder or glob")
        builder, kwargs, bases = spec.name, {"name": spec.config_name}, []
    else:
        builder, kwargs, bases = local
    try:
        if builder == "disk":
            loaded = datasets.load_from_disk(str(Path(spec.name).expanduser()))
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({"train": loaded})
            if spec.streaming:  # already on disk and memory-mapped; streamed only for the same code path
                loaded = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
            return loaded, bases
        return datasets.load_dataset(builder, streaming=spec.streaming, **kwargs), bases
    except (FileNotFoundError, ValueError, OSError) as error:
        raise UserInputError(f"--dataset {spec.name} cannot be read: {str(error).splitlines()[0]}") from None


# ---------------------------------------------------------------------------
# Columns and cells
# ---------------------------------------------------------------------------


def _is_image_feature(feature) -> bool:
    from datasets import Image

    return isinstance(feature, Image)


def resolve_columns(names: list[str], features, spec: DatasetSpec, need_caption: bool = True) -> Columns:
    """The image, caption and id columns, given or detected; a missing one is an error listing the columns."""
    problems = []
    for flag, given in (("--image_column", spec.image_column), ("--caption_column", spec.caption_column),
                        ("--id_column", spec.id_column)):
        if given is not None and given not in names:
            problems.append(f"{flag} {given} is not a column of --dataset {spec.name}.")
    image = spec.image_column or next((n for n in IMAGE_COLUMNS if n in names), None)
    if image is None and features is not None:
        image = next((n for n in names if _is_image_feature(features[n])), None)
    caption = spec.caption_column or next((n for n in CAPTION_COLUMNS if n in names and n != image), None)
    if image is None:
        problems.append(f"--dataset {spec.name} has no image column (looked for {', '.join(IMAGE_COLUMNS)}); pass --image_column.")
    if caption is None and need_caption:
        problems.append(f"--dataset {spec.name} has no caption column (looked for {', '.join(CAPTION_COLUMNS)}); pass --caption_column.")
    if problems:
        raise UserInputError(" ".join(problems) + f" Columns that exist: {', '.join(names) or 'none'}.")
    id_column = spec.id_column or ("__key__" if "__key__" in names else None)
    return Columns(image, caption, id_column)


def captions_of(value) -> list[str]:
    """Non-empty captions in a cell: a string, bytes, a list (several references) or a struct with a text key."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, dict):
        key = next((k for k in CAPTION_KEYS if k in value), None)
        return captions_of(value[key]) if key else []
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in captions_of(v)]
    return []


def image_of(value, bases: list[Path]):
    """(RGB image, None) or (None, reason) from an image cell: {bytes, path}, raw bytes, a path, or a PIL image."""
    from PIL import Image

    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return load_image_bytes(buffer.getvalue())
    if isinstance(value, dict):
        if value.get("bytes"):
            return load_image_bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return load_image_bytes(bytes(value))
    if isinstance(value, str) and value:
        path = Path(value).expanduser()
        candidates = [path] if path.is_absolute() else [base / path for base in bases]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            where = ", ".join(str(b) for b in bases[:3]) or "no local folder (a hub dataset)"
            return None, f"image file {value} not found (looked in {where})"
        return load_image(found)
    return None, "no image in this row" if value in (None, "") else f"unsupported image cell ({type(value).__name__})"


def _undecoded(table, column: str):
    """The table with an Image-feature column left as {bytes, path}, so bad bytes are skipped here, not raised."""
    from datasets import Image

    features = table.features
    if features is not None and _is_image_feature(features.get(column)):
        return table.cast_column(column, Image(decode=False))
    return table


def _row_name(row: dict, columns: Columns, split: str, index: int) -> str:
    if columns.id is not None and row.get(columns.id) not in (None, ""):
        return str(row[columns.id])
    return f"{split}/{index:06d}"


# ---------------------------------------------------------------------------
# Map-style splits (the whole split is on disk, memory-mapped)
# ---------------------------------------------------------------------------


class DatasetImages:
    """Images of a `datasets` split by example name, decoded on access: the dataset counterpart of FolderImages."""

    def __init__(self, table, column: str, row_of: dict[str, int], bases: list[Path], label: str):
        self.table = _undecoded(table.select_columns([column]), column)
        self.column, self.row_of, self.bases, self.label = column, row_of, list(bases), label

    def load(self, name: str):
        row = self.row_of.get(name)
        if row is None:
            return None, f"no row named {name} in {self.label}"
        return image_of(self.table[row][self.column], self.bases)

    def describe(self, name: str) -> str:
        return f"{self.label}: {name}"

    def names(self) -> list[str]:
        return sorted(self.row_of)

    def __str__(self) -> str:
        return self.label


@dataclass
class DatasetSplit:
    images: DatasetImages
    examples: list[Example]


def _meta_rows(table, columns: Columns):
    """Caption and id cells of every row, read without touching the image column."""
    keep = [c for c in (columns.caption, columns.id) if c]
    if not keep:
        yield from ({} for _ in range(table.num_rows))
        return
    for batch in table.select_columns(keep).iter(batch_size=1000):
        yield from (dict(zip(batch, cells)) for cells in zip(*batch.values()))


def read_split(table, columns: Columns, split: str, bases: list[Path], label: str, need_captions: bool = True,
               allow_partial: bool = False) -> DatasetSplit:
    """One Example per (row, caption); rows without a caption are skipped and named in one warning
    (kept as images to caption when need_captions is False)."""
    row_of: dict[str, int] = {}
    examples, empty = [], []
    for index, row in enumerate(_meta_rows(table, columns)):
        name = _row_name(row, columns, split, index)
        captions = captions_of(row.get(columns.caption)) if columns.caption else []
        if not captions:
            empty.append(name)
            if need_captions:
                continue
        row_of.setdefault(name, index)  # rows sharing an id are one image with several references
        examples += [Example(name, caption) for caption in captions]
    if need_captions:
        if not examples:
            raise UserInputError(f"{label}: no row has a caption in column {columns.caption!r}; pass --caption_column.")
        _check_empty_captions(label, columns, empty, len(empty) + len(row_of), allow_partial)
        warn_names(f"Skipped rows of {label} without a caption", empty)
    if not row_of:
        raise UserInputError(f"{label} has no rows.")
    logger.info("%s: %d images, %d captions.", label, len(row_of), len(examples))
    return DatasetSplit(DatasetImages(table, columns.image, row_of, bases, label), examples)


def _check_empty_captions(label: str, columns: Columns, empty: list[str], rows: int, allow_partial: bool) -> None:
    """Stop when more than ALLOWED_LOSS of the rows have an empty caption cell (see utils/caption_files.py)."""
    if len(empty) > ALLOWED_LOSS * rows and not allow_partial:
        raise UserInputError(
            f"{label}: {len(empty)} of {rows} rows ({100 * len(empty) / rows:.1f}%) have no caption in column "
            f"{columns.caption!r} (e.g. {format_names(empty)}), more than {100 * ALLOWED_LOSS:g}%. Pass "
            "--caption_column if the captions are in another column, or --allow_partial_captions to train and "
            "score on the rows that have one."
        )


def _pick_eval_split(splits: list[str], spec: DatasetSpec) -> str | None:
    if spec.eval_split is not None:
        if spec.eval_split not in splits:
            raise UserInputError(f"--eval_split {spec.eval_split} is not a split of --dataset {spec.name}; splits: {', '.join(splits)}.")
        return spec.eval_split
    return next((s for s in EVAL_SPLITS if s in splits and s != spec.train_split), None)


def _require_split(splits: list[str], split: str, spec: DatasetSpec) -> None:
    if split not in splits:
        raise UserInputError(f"--train_split {split} is not a split of --dataset {spec.name}; splits: {', '.join(splits)}.")


def _hold_out(split: DatasetSplit, spec: DatasetSpec, keep: str) -> DatasetSplit:
    train, val = split_by_image(split.examples, spec.split_ratio, spec.seed)
    return DatasetSplit(split.images, train if keep == "train" else val)


def load_train_and_eval(spec: DatasetSpec, hold_out: bool = True) -> tuple[DatasetSplit, DatasetSplit | None]:
    """--train: the training split, and validation from --eval_split, validation/test, or a --split_ratio hold-out
    (hold_out False: no validation from the dataset, e.g. when --test_dir gives it)."""
    loaded, bases = _load(spec)
    splits = list(loaded)
    _require_split(splits, spec.train_split, spec)
    eval_name = _pick_eval_split(splits, spec)
    table = loaded[spec.train_split]
    columns = resolve_columns(list(table.column_names or []), table.features, spec)
    train = read_split(table, columns, spec.train_split, bases, f"{spec.name} [{spec.train_split}]",
                       allow_partial=spec.allow_partial_captions)
    if eval_name is not None:
        val = read_split(loaded[eval_name], columns, eval_name, bases, f"{spec.name} [{eval_name}]",
                         allow_partial=spec.allow_partial_captions)
        return train, val
    if not hold_out:
        return train, None
    logger.info("--dataset %s has no validation split: holding out %.0f%% of its images (--split_ratio).",
                spec.name, 100 * spec.split_ratio)
    return _hold_out(train, spec, "train"), _hold_out(train, spec, "val")


def load_eval_split(spec: DatasetSpec, need_captions: bool = True) -> DatasetSplit:
    """--eval / --inference: --eval_split, else validation/test, else the held-out share of --train_split
    (the images --train validated on with the same --split_ratio and --seed)."""
    loaded, bases = _load(spec)
    splits = list(loaded)
    eval_name = _pick_eval_split(splits, spec)
    name = eval_name or spec.train_split
    _require_split(splits, name, spec)
    table = loaded[name]
    columns = resolve_columns(list(table.column_names or []), table.features, spec, need_captions)
    split = read_split(table, columns, name, bases, f"{spec.name} [{name}]", need_captions, spec.allow_partial_captions)
    if eval_name is None:
        logger.info("--dataset %s has no validation split: using the held-out share of [%s] (--split_ratio %s, --seed %s); "
                    "--eval_split %s takes all of it.", spec.name, name, spec.split_ratio, spec.seed, name)
        held_out = set(split_by_image([Example(n, "") for n in split.images.row_of], spec.split_ratio, spec.seed)[1])
        names = {e.image_name for e in held_out}
        split.images.row_of = {n: r for n, r in split.images.row_of.items() if n in names}
        split.examples = [e for e in split.examples if e.image_name in names]
    return split


# ---------------------------------------------------------------------------
# Streaming (--streaming): read as the Trainer goes, split across ranks by shard
# ---------------------------------------------------------------------------


def split_stream_for_rank(stream, rank_: int, world: int):
    """This rank's part of a streamed split: whole shards when their number divides evenly, else every
    rank reads everything and keeps 1/world of the examples (slower; a warning says so)."""
    from datasets.distributed import split_dataset_by_node

    if world <= 1:
        return stream
    if stream.num_shards % world != 0:
        logger.warning(
            "--streaming: %d shards cannot be split evenly over %d processes, so every process reads all of them "
            "and keeps 1/%d of the examples. Use a number of shards divisible by the number of processes.",
            stream.num_shards, world, world,
        )
    return split_dataset_by_node(stream, rank=rank_, world_size=world)


class StreamingCaptionDataset(torch.utils.data.IterableDataset):
    """{"image", "caption", "image_name"} items read from a streamed split; bad rows are skipped and counted.

    Split across ranks here (utils.distributed), and across DataLoader workers by `datasets` itself.
    The Trainer must not split it again (see split_by_rank).
    """

    split_by_rank = True

    def __init__(self, stream, columns: Columns, split: str, bases: list[Path], shuffle_buffer: int, seed: int):
        self.stream, self.columns, self.split, self.bases = _undecoded(stream, columns.image), columns, split, bases
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer calls this at each pass, for a new shuffle order
        self.epoch = epoch

    def rows(self, rank_: int | None = None, world: int | None = None):
        stream = split_stream_for_rank(self.stream, rank() if rank_ is None else rank_, world_size() if world is None else world)
        if self.shuffle_buffer > 1:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            stream.set_epoch(self.epoch)
        return stream

    def items(self, rank_: int | None = None, world: int | None = None):
        skipped: list[str] = []
        for index, row in enumerate(self.rows(rank_, world)):
            name = _row_name(row, self.columns, self.split, index)
            captions = captions_of(row.get(self.columns.caption))
            image, reason = image_of(row.get(self.columns.image), self.bases) if captions else (None, "no caption")
            if image is None:
                skipped.append(name)
                if len(skipped) <= MAX_NAMES_IN_WARNING:
                    logger.warning("Skipping %s: %s", name, reason)
                continue
            for caption in captions:
                yield {"image": image, "caption": caption, "image_name": name}
        if len(skipped) > MAX_NAMES_IN_WARNING:
            logger.warning("Skipped %d streamed rows in all (bad image or no caption).", len(skipped))

    def __iter__(self):
        return self.items()


def load_streaming_train(spec: DatasetSpec) -> tuple[StreamingCaptionDataset, DatasetSplit | None]:
    """--train --streaming: the training stream, and validation materialised from an eval split if there is one."""
    loaded, bases = _load(spec)
    splits = list(loaded)
    _require_split(splits, spec.train_split, spec)
    stream = loaded[spec.train_split]
    names = list(stream.column_names or (stream.features or {}).keys())
    if not names:  # some streamed sources only know their columns after the first row
        names = list(next(iter(stream.take(1)), {}).keys())
    columns = resolve_columns(names, stream.features, spec)
    train = StreamingCaptionDataset(stream, columns, spec.train_split, bases, spec.shuffle_buffer, spec.seed)
    eval_name = _pick_eval_split(splits, spec)
    if eval_name is None:
        logger.info("--streaming: --dataset %s has no validation split, so training runs without validation.", spec.name)
        return train, None
    val = _materialise(loaded[eval_name], columns)
    return train, read_split(val, columns, eval_name, bases, f"{spec.name} [{eval_name}]", allow_partial=spec.allow_partial_captions)


# A streamed validation split is read into memory up to this many rows (validation runs many times).
MAX_STREAMED_EVAL_ROWS = 1000


def _materialise(stream, columns: Columns):
    import datasets

    keep = [c for c in (columns.image, columns.caption, columns.id) if c]
    rows = [{k: row.get(k) for k in keep} for row in _undecoded(stream, columns.image).take(MAX_STREAMED_EVAL_ROWS)]
    return datasets.Dataset.from_list(rows)


def sample_dataset_images(run_settings: dict, limit: int = 16) -> tuple[object, list[str]]:
    """(image source, names) of a --dataset run's validation images, for the merge fidelity check; (None, [])
    with a warning when the dataset cannot be read now (the merge itself does not need it)."""
    spec = DatasetSpec.from_run_settings(run_settings)
    try:
        if run_settings.get("streaming"):  # never download a streamed set: take the first rows as they come
            stream, _ = load_streaming_train(dataclasses.replace(spec, streaming=True, shuffle_buffer=0))
            rows = [(item["image_name"], item["image"]) for item, _ in zip(stream.items(0, 1), range(limit))]
            return _InMemoryImages(dict(rows)), [name for name, _ in rows]
        split = load_eval_split(spec)
    except UserInputError as error:
        logger.warning("Merge fidelity check skipped: %s", error)
        return None, []
    wanted = [n for n in run_settings.get("val_images") or [] if n in split.images.row_of] or split.images.names()
    return split.images, wanted[:limit]


class _InMemoryImages:
    def __init__(self, images: dict):
        self.images = images

    def load(self, name: str):
        return self.images.get(name), None if name in self.images else f"no image named {name}"

    def describe(self, name: str) -> str:
        return name
