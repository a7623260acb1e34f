"""Files the user keeps, written atomically (temporary name, then rename): text, JSON, caption CSVs, folders."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from utils.dataset_utils import read_captions_file, read_text
from utils.errors import UserInputError

logger = logging.getLogger(__name__)


def write_text_atomic(path: Path, text: str) -> None:
    """Write text via a temporary file in the same folder, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        give_default_permissions(Path(tmp))  # mkstemp makes the file private (0600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def unwritable_reason(path: Path, kind: str = "folder") -> str | None:
    """Why `path` (a folder to create or fill, or a file to write) cannot be written, or None when it can.

    Asked before any model or data loads, so a run never fails at its end for want of a place to write.
    A temporary file is really created where the first new entry would go: permission bits alone say
    nothing for root, and read-only mounts, full disks and pseudo file systems only show when tried.
    """
    path = Path(path)
    if path.exists():
        if kind == "folder" and not path.is_dir():
            return f"{path} is a file, not a folder"
        if kind == "file" and path.is_dir():
            return f"{path} is a folder, not a file"
    existing = _nearest_existing(path if kind == "folder" else path.parent)
    if not existing.is_dir():
        return f"{existing} is a file, so nothing can be created under it"
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write-check."):
            pass
    except OSError as error:
        return f"nothing can be written in {existing} ({error.strerror or error})"
    if kind == "file" and path.is_file() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def give_default_permissions(path: Path) -> None:
    """Give a file, or every file under a folder, the mode a plain open() would have given it.

    Writers that go through a temporary file create it private (0600): mkstemp does, and so does safetensors
    since 0.8.1 (its writer uses a NamedTempFile), which left model.safetensors unreadable to the
    group and others while the rest of the run was readable. An executable file stays executable (0777 less umask).
    """
    path, umask = Path(path), _umask()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        executable = file.stat().st_mode & 0o111
        os.chmod(file, (0o777 if executable else 0o666) & ~umask)


def write_predictions_csv(
    path: Path, predictions: dict[str, str], references: dict[str, list[str]] | None = None
) -> None:
    """CSV `image_name,caption[,reference_1,...]`, sorted by image name, written atomically."""
    names = sorted(predictions)
    refs = {name: list((references or {}).get(name, [])) for name in names}
    n_refs = max((len(r) for r in refs.values()), default=0) if references is not None else 0
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_name", "caption"] + [f"reference_{i}" for i in range(1, n_refs + 1)])
    for name in names:
        writer.writerow([name, predictions[name]] + refs[name] + [""] * (n_refs - len(refs[name])))
    write_text_atomic(path, buffer.getvalue())


def _replace_nonfinite(obj):
    """Copy of obj with NaN/inf floats as None and numpy scalars/arrays as plain Python values."""
    if isinstance(obj, (np.ndarray, np.generic)):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _replace_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_replace_nonfinite(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj) -> None:
    """JSON (indent 2, NaN/inf written as null) via a temporary file in the same folder."""
    text = json.dumps(_replace_nonfinite(obj), indent=2, allow_nan=False, ensure_ascii=False, default=str)
    write_text_atomic(path, text + "\n")


def read_predictions_file(path: Path, allow_partial: bool = False) -> dict[str, str]:
    """First caption per image from a predictions CSV (ours with reference columns, or any captions file)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(
            f"--predictions_file {path} does not exist or is not a file. Give the CSV written by "
            "the inference mode (predictions.csv in its output folder), or any `image_name,caption` CSV."
        )
    rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
    header = [cell.strip().lower() for cell in rows[0][:2]] if rows else []
    if header != ["image_name", "caption"]:
        return {name: captions[0] for name, captions in read_captions_file(path, allow_partial, "--predictions_file").items()}
    # Our own files: column 2 is the prediction; later columns are references, not part of it.
    predictions: dict[str, str] = {}
    for row in rows[1:]:
        if row and row[0].strip():
            predictions.setdefault(row[0].strip(), row[1] if len(row) > 1 else "")
    if not predictions:
        raise UserInputError(f"--predictions_file {path} has a header but no `image_name,caption` row.")
    return predictions


def replace_folder_atomically(tmp: Path, final: Path) -> None:
    """Move a fully written folder tmp to final; an existing final is kept until the new one is in place.
    Its files get the permissions plain files have (see give_default_permissions)."""
    give_default_permissions(tmp)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------
# A run's image lists: RUN/splits/NAME.txt, one image name per line; run_config.json keeps count and hash
# ---------------------------------------------------------------------------

SPLITS_DIR = "splits"


def write_split_file(run_dir: Path, split: str, names) -> dict:
    """Write RUN/splits/{split}.txt (sorted names, one a line); returns what run_config.json keeps of it."""
    text = "".join(f"{name}\n" for name in sorted(names))
    write_text_atomic(Path(run_dir) / SPLITS_DIR / f"{split}.txt", text)
    return {"file": f"{SPLITS_DIR}/{split}.txt", "images": len(names),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def read_split_names(run_dir: Path, settings: dict, split: str = "validation") -> list[str]:
    """The image names of a run's split: RUN/splits/{split}.txt, or the `val_images` list that runs written
    before it kept in run_config.json. [] when neither exists; a file that does not match its hash is a warning."""
    path = Path(run_dir) / SPLITS_DIR / f"{split}.txt"
    if not path.is_file():
        return list(settings.get("val_images") or []) if split == "validation" else []
    text = path.read_text(encoding="utf-8")
    expected = ((settings.get("splits") or {}).get(split) or {}).get("sha256")
    if expected and hashlib.sha256(text.encode("utf-8")).hexdigest() != expected:
        logger.warning("%s does not match the hash run_config.json keeps for it: it was "
                                            "changed after training; its names are used as they are.", path)
    return text.split("\n")[:-1]


# ---------------------------------------------------------------------------
# Resumable captioning: one append-only part file per rank, assembled once at the end
# ---------------------------------------------------------------------------


def caption_parts_dir(target: Path) -> Path:
    """Where the part files of a captioning job writing `target` live: a hidden folder beside it."""
    target = Path(target)
    return target.with_name(f".{target.name}.parts")


class CaptionPartWriter:
    """Appends `image_name,caption,skipped_reason` rows to PARTS/rank-NNNNN.csv, flushed after every batch,
    so a killed job loses at most the batch in flight. A half-written last line left by a kill is cut
    off before appending (it would otherwise run into the next row)."""

    def __init__(self, parts_dir: Path, rank: int):
        self.path = Path(parts_dir) / f"rank-{rank:05d}.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._handle = open(self.path, "a", encoding="utf-8", newline="")
        self._writer = csv.writer(self._handle, lineterminator="\n")

    def append(self, captions: dict[str, str], skipped: dict[str, str]) -> None:
        self._writer.writerows([name, caption, ""] for name, caption in captions.items())
        self._writer.writerows([name, "", reason or "unreadable"] for name, reason in skipped.items())
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "CaptionPartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_partial_last_line(path: Path) -> None:
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def read_caption_parts(parts_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(captions, skipped) from every part file in parts_dir, whatever number of ranks wrote them.

    Only complete rows count: text after the last newline (a row cut off by a kill) and rows without
    exactly three fields are ignored, so those images are captioned again.
    """
    captions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for path in sorted(Path(parts_dir).glob("rank-*.csv")):
        text = path.read_bytes().decode("utf-8", errors="replace")
        text = text[: text.rfind("\n") + 1]
        for row in csv.reader(io.StringIO(text, newline="")):
            if len(row) != 3 or not row[0]:
                continue
            name, caption, reason = row
            if reason:
                skipped[name] = reason
            else:
                captions[name] = caption
    return captions, skipped
