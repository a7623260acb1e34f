"""A disk-backed table of fixed-size feature rows (one per image), memory-mapped so it never has to fit in RAM."""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

from utils.io import write_json_atomic

# numpy has no bfloat16: those rows are stored as their raw 16 bits and viewed back by torch.
_STORAGE = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}


def feature_cache_bytes(rows: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return rows * int(np.prod(row_shape)) * torch.tensor([], dtype=dtype).element_size()


def _crc(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row).view(np.uint8))


def _fingerprint(keys: list[str], row_shape: tuple[int, ...], dtype: torch.dtype, source: str) -> str:
    digest = hashlib.sha256(json.dumps([keys, list(row_shape), str(dtype), source]).encode("utf-8"))
    return digest.hexdigest()


class FeatureStore:
    """Rows of `row_shape` in `dtype`, addressed by key, in FOLDER/features.bin, with a crc32 per row and a filled mask.

    Reopening a folder made for the same keys, shape, dtype and source (e.g. on --resume) keeps the rows
    already filled, but only those that prove themselves: every file must have the size meta.json implies
    (numpy's memmap would otherwise grow a truncated file back with zeros), and every filled row must match
    the checksum written after it, so zeroed or torn rows are encoded again (`refilled` counts them). A
    cache that cannot be trusted as a whole is rebuilt (`rebuilt` says why). Rows are written as they are
    computed, so an interrupted fill loses nothing already written.
    """

    def __init__(self, folder: Path, keys: list[str], row_shape: tuple[int, ...], dtype: torch.dtype, source: str,
                 verify: bool = True):
        self.folder, self.keys, self.row_shape, self.dtype = Path(folder), list(keys), tuple(row_shape), dtype
        self.index = {key: i for i, key in enumerate(self.keys)}
        fingerprint = _fingerprint(self.keys, self.row_shape, dtype, source)
        self.rebuilt = self._distrust(fingerprint)  # None: the files are reused
        reuse = self.rebuilt is None
        if not reuse:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        mode = "r+" if reuse else "w+"
        shapes = self._shapes()
        self._rows = np.memmap(self.folder / "features.bin", dtype=shapes["features.bin"][1], mode=mode, shape=shapes["features.bin"][0])
        self._checksums = np.memmap(self.folder / "checksums.bin", dtype=np.uint32, mode=mode, shape=(len(self.keys),))
        self._filled = np.memmap(self.folder / "filled.bin", dtype=np.uint8, mode=mode, shape=(len(self.keys),))
        if not reuse:
            write_json_atomic(self.folder / "meta.json", {
                "fingerprint": fingerprint, "rows": len(self.keys), "row_shape": list(self.row_shape),
                "dtype": str(dtype).replace("torch.", ""), "source": source, "checksum": "crc32 per row"})
        self.refilled = self._drop_unverified() if reuse and verify else 0
        self.reused = int(np.count_nonzero(self._filled)) if reuse else 0

    def _shapes(self) -> dict[str, tuple[tuple[int, ...], type]]:
        return {"features.bin": ((len(self.keys), *self.row_shape), _STORAGE[self.dtype]),
                "checksums.bin": ((len(self.keys),), np.uint32), "filled.bin": ((len(self.keys),), np.uint8)}

    def _distrust(self, fingerprint: str) -> str | None:
        """Why the files in the folder cannot be reused, or None when they can (they still verify row by row)."""
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            return "no cache yet"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return f"its meta.json cannot be read ({error})"
        if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint:
            return "it was made for other images, model or precision"
        for name, (shape, storage) in self._shapes().items():
            path, expected = self.folder / name, int(np.prod(shape)) * np.dtype(storage).itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                return f"{name} is {'missing' if size is None else f'{size} bytes'} where meta.json implies {expected}"
        return None

    def _drop_unverified(self) -> int:
        """Unmark the filled rows whose bytes no longer match their checksum; how many there were."""
        bad = [i for i in np.flatnonzero(self._filled) if _crc(self._rows[i]) != self._checksums[i]]
        if bad:
            self._filled[bad] = 0
            self._filled.flush()
        return len(bad)

    @property
    def nbytes(self) -> int:
        return feature_cache_bytes(len(self.keys), self.row_shape, self.dtype)

    def missing(self) -> list[str]:
        return [key for key, filled in zip(self.keys, self._filled) if not filled]

    def write(self, keys: list[str], rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", self.dtype).contiguous()
        array = rows.view(torch.uint16).numpy() if self.dtype == torch.bfloat16 else rows.numpy()
        for key, row in zip(keys, array):
            self._rows[self.index[key]] = row
        self._rows.flush()
        for key, row in zip(keys, array):  # each file flushed before the next: a row is filled only once it is on disk
            self._checksums[self.index[key]] = _crc(row)
        self._checksums.flush()
        for key in keys:
            self._filled[self.index[key]] = 1
        self._filled.flush()

    def read(self, key: str) -> torch.Tensor:
        row = torch.from_numpy(np.array(self._rows[self.index[key]]))
        return row.view(torch.bfloat16) if self.dtype == torch.bfloat16 else row

    def is_filled(self, key: str) -> bool:
        return bool(self._filled[self.index[key]])

    def remove(self) -> None:
        """Delete the files, and the parent folder too when nothing else is left in it."""
        del self._rows, self._checksums, self._filled
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:  # another node's cache, or anything else, is still there
            pass
