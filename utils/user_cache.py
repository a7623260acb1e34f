"""The user cache (GIT_QLORA_CACHE, else $XDG_CACHE_HOME/git_qlora, else ~/.cache/git_qlora): what can be rebuilt, kept between runs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "cache_manifest.json"


def user_cache_dir(*parts: str) -> Path:
    root = os.environ.get("GIT_QLORA_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "git_qlora"
    return Path(root).expanduser().joinpath(*parts)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _file_digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def read_cached_folder(entry: Path) -> dict | None:
    """The manifest of a cached folder whose files all match their recorded digests; None when absent or not intact."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or _folder_digests(entry) != manifest.get("files"):
        logger.warning("The cached copy in %s does not match its manifest (damaged or edited); it is rebuilt.", entry)
        return None
    return manifest


def store_folder(source: Path, entry: Path, info: dict) -> bool:
    """Copy a finished folder into the cache as entry, with a manifest of its files' digests.

    The copy is made under a temporary name and renamed into place, so an interrupted copy is never read
    as a cache entry. Returns False (with a warning) when the cache cannot be written: it is only a shortcut.
    """
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.", suffix=".tmp"))
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        manifest = {**info, "files": _folder_digests(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(entry, ignore_errors=True)  # a damaged entry of the same key
        os.replace(tmp, entry)
        return True
    except OSError as error:
        logger.warning("Could not keep a copy in the user cache %s (%s); the next run builds it again. "
                       "Set GIT_QLORA_CACHE to a writable folder to keep it.", entry.parent, error)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return False
