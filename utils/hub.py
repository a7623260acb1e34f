"""Local folder or Hugging Face hub id? Fail within seconds, not minutes of retries, when the hub cannot be reached."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

from utils.errors import UserInputError

logger = logging.getLogger(__name__)

# One probe of the hub endpoint, so an unreachable hub costs seconds instead of the download
# retries (five per file, about 23 s each, several files per model) that end in the same error.
PROBE_TIMEOUT_S = 3.0


def looks_like_path(name: str) -> bool:
    """True for names that can only be paths: absolute, ./ ../ ~, backslashes, or more than one '/'."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).is_absolute()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub read it, or as set by use_offline_mode."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def use_offline_mode() -> None:
    """Read cached copies only from now on, in this process and any it starts (as HF_HUB_OFFLINE=1 would)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # is_offline_mode() reads this at call time
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


@functools.lru_cache(maxsize=1)
def hub_unreachable_reason() -> str | None:
    """None when the hub endpoint answers within PROBE_TIMEOUT_S, else why not (probed once per process)."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except Exception as error:  # noqa: BLE001 - DNS, refused, timeout, proxy: all mean "not reachable"
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no answer'}"
    return None


def is_cached(repo_id: str, repo_type: str = "model") -> bool:
    """True when a snapshot of repo_id is in the local hub cache (usable without the network)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, or a malformed id
        return False
    return True


def check_hub_name(name: str, flag: str, repo_type: str = "model", local_hint: str = "a local folder") -> None:
    """Return at once for a local path or a reachable hub; else raise UserInputError within seconds.

    A hub id already in the cache is still used when the hub is unreachable: this process then
    switches to offline mode so the libraries read the cache without first retrying for minutes.
    """
    if Path(name).expanduser().exists():
        return
    if looks_like_path(name):
        raise UserInputError(f"{flag} {name}: no such file or folder. Check the path, or give a hub id such as org/name.")
    if hub_offline():
        if is_cached(name, repo_type):
            return
        raise UserInputError(
            f"{flag} {name!r} is not {local_hint} and HF_HUB_OFFLINE is set, and no copy of it is in the local "
            f"Hugging Face cache. Give {local_hint} instead, or unset HF_HUB_OFFLINE on a machine with network "
            "access to download it once."
        )
    reason = hub_unreachable_reason()
    if reason is None:
        return
    if is_cached(name, repo_type):
        logger.warning("The Hugging Face hub cannot be reached (%s); using the cached copy of %s.", reason, name)
        use_offline_mode()
        return
    raise UserInputError(
        f"{flag} {name!r} is not {local_hint}, so it would be downloaded from the Hugging Face hub, which cannot be "
        f"reached ({reason}). Give {local_hint} instead, or run once with network access (the download is cached "
        "for later offline runs; set HF_HUB_OFFLINE=1 to use only cached copies)."
    )


def describe_load_error(name_or_path: str, err: Exception) -> str:
    """First line of a model-loading error; for a missing folder, say so instead of transformers' repo-id complaint."""
    looks_like_path = name_or_path.startswith((".", "~")) or Path(name_or_path).is_absolute()
    if looks_like_path and not Path(name_or_path).expanduser().exists():
        return f"no such folder: {name_or_path}"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
