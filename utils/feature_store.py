"""A disk-backed table of fixed-size feature rows (one per image), memory-mapped so it never has to fit in RAM."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from utils.io import write_json_atomic

# numpy has no bfloat16: those rows are stored as their raw 16 bits and viewed back by torch.
_STORAGE = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}


def feature_cache_bytes(rows: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return rows * int(np.prod(row_shape)) * torch.tensor([], dtype=dtype).element_size()


def _fingerprint(keys: list[str], row_shape: tuple[int, ...], dtype: torch.dtype, source: str) -> str:
    digest = hashlib.sha256(json.dumps([keys, list(row_shape), str(dtype), source]).encode("utf-8"))
    return digest.hexdigest()


class FeatureStore:
    """Rows of `row_shape` in `dtype`, addressed by key, in FOLDER/features.bin plus a filled mask.

    Reopening a folder made for the same keys, shape, dtype and source (e.g. on --resume) keeps the rows
    already filled; anything else starts afresh. Rows are written as they are computed, so an interrupted
    fill loses nothing already written.
    """

    def __init__(self, folder: Path, keys: list[str], row_shape: tuple[int, ...], dtype: torch.dtype, source: str):
        self.folder, self.keys, self.row_shape, self.dtype = Path(folder), list(keys), tuple(row_shape), dtype
        self.index = {key: i for i, key in enumerate(self.keys)}
        fingerprint = _fingerprint(self.keys, self.row_shape, dtype, source)
        meta_path = self.folder / "meta.json"
        reuse = meta_path.is_file() and json.loads(meta_path.read_text(encoding="utf-8")).get("fingerprint") == fingerprint
        if not reuse:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        mode = "r+" if reuse else "w+"
        self._rows = np.memmap(self.folder / "features.bin", dtype=_STORAGE[dtype], mode=mode, shape=(len(self.keys), *self.row_shape))
        self._filled = np.memmap(self.folder / "filled.bin", dtype=np.uint8, mode=mode, shape=(len(self.keys),))
        if not reuse:
            write_json_atomic(meta_path, {"fingerprint": fingerprint, "rows": len(self.keys), "row_shape": list(self.row_shape),
                                          "dtype": str(dtype).replace("torch.", ""), "source": source})

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
        for key in keys:  # marked only once its row is on disk
            self._filled[self.index[key]] = 1
        self._filled.flush()

    def read(self, key: str) -> torch.Tensor:
        row = torch.from_numpy(np.array(self._rows[self.index[key]]))
        return row.view(torch.bfloat16) if self.dtype == torch.bfloat16 else row

    def is_filled(self, key: str) -> bool:
        return bool(self._filled[self.index[key]])

    def remove(self) -> None:
        """Delete the files, and the parent folder too when nothing else is left in it."""
        del self._rows, self._filled
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()
        except OSError:  # another node's cache, or anything else, is still there
            pass
