"""Read caption files (captions.csv, metadata.csv/jsonl) row by row, naming every row that cannot be read.

A CSV reader left to itself lets one stray quote swallow the rest of the file into a single caption, and
stops at junk bytes with a traceback and no line number. Here each physical line is decoded on its own, a
quoted field may run over line breaks only while the lines it takes in do not look like rows of their own,
and every row that cannot be used is skipped with its line number. When more than ALLOWED_LOSS of the
listed images lose their captions that way, reading stops (UserInputError) unless the caller allows it
(--allow_partial_captions): training on what is left would quietly be training on another data set.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import UserInputError

logger = logging.getLogger("utils.dataset_utils")  # the logger users and tests have always seen these under

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# First-row values that mark a header rather than a data row.
IMAGE_HEADER_NAMES = ("image_name", "file_name", "image", "filename", "file", "image_path", "path")
CAPTION_HEADER_NAMES = ("caption", "text", "captions")
# Hugging Face imagefolder names its caption column freely; these are the ones we accept, in order.
METADATA_CAPTION_KEYS = ("text", "caption", "captions")

# Share of the listed images that may lose their captions to unreadable rows before reading stops.
ALLOWED_LOSS = 0.01
# Problem rows named one by one in a message; the rest are counted.
MAX_ROWS_NAMED = 10

# A line that starts like a row of its own: an image file name, then a comma ("img_008.png,...").
_ROW_START = re.compile(r'^\s*"?[^",]+\.(?:' + "|".join(e[1:] for e in IMAGE_EXTENSIONS) + r')"?\s*,', re.IGNORECASE)


@dataclass
class RowProblems:
    """Rows of one file that could not be used: (line number, why), and the image names they held if known."""

    path: Path
    rows: list[tuple[int, str]] = field(default_factory=list)
    names: list[str | None] = field(default_factory=list)

    def add(self, line: int, reason: str, name: str | None = None) -> None:
        self.rows.append((line, reason))
        self.names.append(name)

    def describe(self) -> str:
        shown = "; ".join(f"line {line}: {reason}" for line, reason in self.rows[:MAX_ROWS_NAMED])
        more = len(self.rows) - MAX_ROWS_NAMED
        return shown + (f"; and {more} more row(s)" if more > 0 else "")


def _undecodable(data: bytes) -> str | None:
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as err:
        return f"not UTF-8 text (byte 0x{data[err.start]:02x} at column {err.start + 1}); save the file as UTF-8"


def _lines(data: bytes) -> list[bytes]:
    """Physical lines without their line ends (\\n, \\r\\n, or \\r alone in old Mac files)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\n" not in data and b"\r" in data:
        return data.split(b"\r")
    return [line[:-1] if line.endswith(b"\r") else line for line in data.split(b"\n")]


# Control characters (Unicode category Cc) other than tab and newline: never part of a caption.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _junk(text: str) -> str | None:
    """Why a decoded record is junk (control characters, a stray carriage return), or None."""
    bad = sorted(set(_CONTROL.findall(text)))
    if bad:
        shown = ", ".join(repr(c) for c in bad[:3])
        return f"control characters ({shown}) in the row; the file is damaged or not a caption CSV"
    return None


def _open_quote(text: str) -> bool:
    """True when text ends inside a quoted CSV field. As in Python's csv module, a quote opens a field only at
    its start (`a 5" screen` is plain text), and `""` inside a quoted field is a literal quote."""
    if '"' not in text:
        return False
    quoted, at_start, k = False, True, 0
    while k < len(text):
        c = text[k]
        if quoted and c == '"':
            if text[k + 1:k + 2] == '"':
                k += 1
            else:
                quoted = False
        elif c == '"' and at_start:
            quoted = True
        at_start = not quoted and c in ",\n"
        k += 1
    return quoted


def _first_cell(text: str) -> str | None:
    name = text.split(",", 1)[0].strip().strip('"').strip()
    return name or None


def _gather_record(lines: list[bytes], i: int) -> tuple[str | None, int, str | None]:
    """(text, index after it, None) of the record starting at lines[i], or (None, i + 1, why) for a broken one.

    A quoted field running over a line break is a multi-line caption, unless a line it would take in looks
    like a new row (`name.ext,`) or the file ends first: then the quote is unbalanced, and reading goes on
    at the next line.
    """
    reason = _undecodable(lines[i])
    if reason:
        return None, i + 1, reason
    text, j = lines[i].decode("utf-8"), i + 1
    while _open_quote(text) and j < len(lines):
        nxt = lines[j].decode("utf-8", "replace")
        if _ROW_START.match(nxt):
            break
        reason = reason or _undecodable(lines[j])
        text, j = text + "\n" + nxt, j + 1
    if _open_quote(text):
        where = f"line {j + 1} looks like a new row ({nxt[:40]!r})" if j < len(lines) else "the file ends first"
        return None, i + 1, f"a quoted caption opens here and never closes ({where}): an unbalanced quote"
    return (None, j, reason) if reason else (text, j, _junk(text))


def read_csv_rows(path: Path, problems: RowProblems) -> list[tuple[int, list[str]]]:
    """(first line number, cells) of every non-blank CSV record of path; unusable records go to problems."""
    lines = _lines(Path(path).read_bytes())
    records: list[tuple[int, list[str]]] = []
    i = 0
    while i < len(lines):
        start = i + 1
        text, i, reason = _gather_record(lines, i)
        if text is not None and not text.strip():
            continue
        if reason is None:
            try:  # without quotes a CSV row is its text split at commas
                records.append((start, text.split(",") if '"' not in text else next(csv.reader([text]))))
                continue
            except (csv.Error, StopIteration) as err:
                reason = f"not a CSV row ({err})"
        problems.add(start, reason, _first_cell(lines[start - 1].decode("utf-8", "replace")))
    return records


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%" if share == 0 or share >= 0.0005 else "<0.1%"


def check_losses(problems: RowProblems, kept_names: set[str], flag: str, allow_partial: bool) -> None:
    """Warn about the unusable rows; stop when more than ALLOWED_LOSS of the listed images lost their captions."""
    if not problems.rows:
        return
    named = {normalise_image_name(n) for n in problems.names if n is not None} - kept_names
    lost = len(named) + sum(n is None for n in problems.names)
    listed = len(kept_names) + lost
    share = lost / listed if listed else 1.0
    summary = (f"{flag} {problems.path}: {len(problems.rows)} row(s) could not be read, so {lost} of the {listed} "
               f"listed images ({_percent(share)}) have no caption: {problems.describe()}.")
    if share > ALLOWED_LOSS and not allow_partial:
        raise UserInputError(
            f"{summary} That is more than {100 * ALLOWED_LOSS:g}% of the images, so nothing was trained or scored on "
            "what is left. Repair those lines (a quote without its partner, bytes that are not UTF-8, a row "
            "without `image_name,caption`), or pass --allow_partial_captions to go on without those images."
        )
    logger.warning("%s Those rows are skipped.", summary)


def _is_header(row: list[str]) -> bool:
    cells = [c.strip().lower() for c in row]
    return len(cells) >= 2 and cells[0] in IMAGE_HEADER_NAMES and cells[1] in CAPTION_HEADER_NAMES


def normalise_image_name(name: str) -> str:
    """Posix form of a name from a captions file: backslashes to '/', leading './' removed."""
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _parse_caption_row(row: list[str]) -> tuple[str, str] | None:
    """(image name, caption) from one CSV row, or None when the row is unusable."""
    cells = list(row)
    # Spreadsheets often leave trailing empty cells; they are not part of the caption.
    while len(cells) > 2 and not cells[-1].strip():
        cells.pop()
    if len(cells) < 2:
        return None
    # More than two cells means the caption held unquoted commas: put them back.
    name, caption = normalise_image_name(cells[0]), ",".join(cells[1:]).strip()
    if not name or not caption:
        return None
    return name, caption


def read_captions_file(path: Path, allow_partial: bool = False, flag: str = "--captions_file") -> dict[str, list[str]]:
    """Captions per image name from a CSV of `image_name,caption` rows (header optional)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(
            f"{flag} {path} does not exist or is not a file. Give the path of a CSV "
            "file with one `image_name,caption` row per caption, or leave the flag out to use "
            "the folder's metadata.csv/metadata.jsonl or the image file names as captions."
        )
    problems = RowProblems(path)
    rows = [(line, row) for line, row in read_csv_rows(path, problems) if any(c.strip() for c in row)]
    if rows and _is_header(rows[0][1]):
        rows = rows[1:]
    captions: dict[str, list[str]] = {}
    for line, row in rows:
        parsed = _parse_caption_row(row)
        if parsed is None:
            name = normalise_image_name(row[0]) if row and row[0].strip() else None
            problems.add(line, "no `image_name,caption` pair (a field is missing or empty)", name)
            continue
        captions.setdefault(parsed[0], []).append(parsed[1])
    if not captions:
        raise UserInputError(
            f"{flag} {path} has no usable row. Each row must be `image_name,caption` "
            "(an optional first header row such as `image_name,caption` is allowed)."
            + (f" Unreadable rows: {problems.describe()}." if problems.rows else "")
        )
    check_losses(problems, set(captions), flag, allow_partial)
    return captions


def _caption_list(value) -> list[str] | None:
    """Captions from a metadata value: a string or a list of strings; None if unusable."""
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        return None
    captions = [v.strip() for v in values if v.strip()]
    return captions or None


def _csv_records(path: Path, problems: RowProblems) -> list[tuple[int, dict]]:
    rows = read_csv_rows(path, problems)
    if not rows:
        return []
    header = [c.strip() for c in rows[0][1]]
    records = []
    for line, cells in rows[1:]:
        if len(cells) < len(header):
            problems.add(line, f"{len(cells)} field(s) where the header has {len(header)}", _first_cell(",".join(cells)))
            continue
        records.append((line, dict(zip(header, cells))))
    return records


def _jsonl_records(path: Path, problems: RowProblems) -> list[tuple[int, dict]]:
    records = []
    for number, raw in enumerate(_lines(path.read_bytes()), start=1):
        reason = _undecodable(raw)
        if reason is None and raw.strip():
            try:
                record = json.loads(raw.decode("utf-8"))
                reason = None if isinstance(record, dict) else "not a JSON object"
            except json.JSONDecodeError as err:
                reason = f"not JSON ({err.msg})"
            if reason is None:
                records.append((number, record))
        if reason is not None:
            problems.add(number, reason)
    return records


def _pick_caption_key(path: Path, records: list[tuple[int, dict]]) -> str:
    keys = {k for _, r in records for k in r if isinstance(k, str)}
    caption_key = next((k for k in METADATA_CAPTION_KEYS if k in keys), None)
    if "file_name" not in keys or caption_key is None:
        raise UserInputError(
            f"{path} needs a `file_name` column and a `text` (or `caption`) column, as in the "
            f"Hugging Face imagefolder layout; found columns: {sorted(keys) or 'none'}. "
            "Rename the columns, or pass a CSV with --captions_file."
        )
    return caption_key


def read_folder_metadata(folder: Path, allow_partial: bool = False) -> dict[str, list[str]] | None:
    """Captions from the folder's metadata.csv or metadata.jsonl; None when it has neither."""
    folder = Path(folder)
    candidates = [p for p in (folder / "metadata.csv", folder / "metadata.jsonl") if p.is_file()]
    if not candidates:
        return None
    if len(candidates) > 1:
        raise UserInputError(
            f"{folder} holds both metadata.csv and metadata.jsonl; it is unclear which one to use. "
            "Remove one of them, or pass the captions with --captions_file."
        )
    path = candidates[0]
    problems = RowProblems(path)
    records = (_csv_records if path.suffix == ".csv" else _jsonl_records)(path, problems)
    caption_key = _pick_caption_key(path, records)
    captions: dict[str, list[str]] = {}
    for line, record in records:
        name, texts = record.get("file_name"), _caption_list(record.get(caption_key))
        if not isinstance(name, str) or not normalise_image_name(name) or texts is None:
            problems.add(line, f"no `file_name` and non-empty `{caption_key}`", normalise_image_name(name) if isinstance(name, str) else None)
            continue
        captions.setdefault(normalise_image_name(name), []).extend(texts)
    if not captions:
        raise UserInputError(
            f"{path} has no usable line (each needs `file_name` and a non-empty caption)."
            + (f" Unreadable rows: {problems.describe()}." if problems.rows else "")
        )
    check_losses(problems, set(captions), "the metadata file", allow_partial)
    return captions


def load_captions(folder: Path, captions_file: Path | None, allow_partial: bool = False) -> dict[str, list[str]] | None:
    """Captions from --captions_file, else the folder's metadata; None means use file names."""
    if captions_file is not None:
        return read_captions_file(Path(captions_file), allow_partial)
    return read_folder_metadata(Path(folder), allow_partial)
