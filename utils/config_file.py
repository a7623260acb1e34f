"""--config FILE: settings from YAML or JSON (keys are the flags without dashes), under the command line's flags."""

import argparse
import dataclasses
import difflib
import json
import logging
import types
import typing
from pathlib import Path

from utils.config import DERIVED_FIELDS, MODES, Config
from utils.errors import UserInputError

logger = logging.getLogger(__name__)

FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name not in DERIVED_FIELDS}
# Flags whose unset value depends on the mode (build_config resolves them), so the parser keeps None.
MODE_DEPENDENT = ("output_dir",)
# What run_config.json records besides the flags (scripts/trainer.py write_run_config, record_resume): facts about
# the run, not settings, so a rerun from the file ignores them. A key written there must be listed here.
RECORDED_RUN_KEYS = (
    "base_model", "device", "precision", "compute_dtype", "training_autocast", "world_size", "effective_batch_size",
    "library_versions", "created", "num_train_examples", "num_val_examples", "truncated_train_captions", "val_dir",
    "val_images", "splits", "resumes", *DERIVED_FIELDS,
)
# A run record names its own run: rerunning from it starts a new run, never continues or overwrites the old one.
NOT_RERUN = ("run_name", "resume")


def flag_value(value):
    """A Config value as the command line writes it (the parser's default)."""
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value) if isinstance(value, Path) else value


def parser_defaults(parser: argparse.ArgumentParser) -> dict:
    """Each flag's default from its Config field, the one source; a stray default= that disagrees is a bug."""
    defaults = {}
    for action in parser._actions:
        field = FIELDS.get(action.dest)
        if field is None or action.dest == "mode" or action.dest in MODE_DEPENDENT:
            continue
        wanted = flag_value(field.default)
        if action.default not in (None, False, wanted):
            raise RuntimeError(f"--{action.dest}: add_argument default {action.default!r} differs from Config's {wanted!r}")
        defaults[action.dest] = wanted
    return defaults


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The settings given on the command line, even those equal to their default (parsed with no defaults)."""
    parser._defaults.clear()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv)
    return set(vars(given))


def read_settings_file(path: Path) -> dict:
    """The file's mapping of keys to values; JSON by its suffix, else YAML (which also reads JSON)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserInputError(f"--config {path} {what}. Give a YAML or JSON file of settings (see examples/).")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as error:
            raise UserInputError(f"--config {path} is not valid JSON: {error}. Fix the file (or write it as YAML).") from None
    else:
        data = _load_yaml(path, text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserInputError(f"--config {path} must hold a mapping of settings (`lora_r: 16`, one per line); "
                             f"it holds a {type(data).__name__}.")
    return data


def _load_yaml(path: Path, text: str):
    try:
        import yaml
    except ImportError:
        raise UserInputError(f"--config {path} is YAML, which needs PyYAML: pip install pyyaml (or give a .json file).") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        hint = " YAML indents with spaces, never tabs: replace the tabs." if "\t" in text else ""
        raise UserInputError(f"--config {path} is not valid YAML{at}: {problem}.{hint}") from None


def _kind(field) -> tuple[type, bool]:
    """(the field's value type, whether null is allowed)."""
    args = typing.get_args(field.type)
    if isinstance(field.type, types.UnionType) or typing.get_origin(field.type) is typing.Union:
        return next(a for a in args if a is not type(None)), type(None) in args
    return (tuple if typing.get_origin(field.type) is tuple else field.type), False


def _convert(key: str, value, problems: list[str]):
    """The file's value as the parser would have produced it, or a problem naming the key."""
    kind, nullable = _kind(FIELDS[key])
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a text", Path: "a path",
             tuple: "a list of names (or one comma-separated text)"}
    if value is None:
        if nullable:
            return None
        problems.append(f"{key}: null is not allowed; give {names[kind]} (default {flag_value(FIELDS[key].default)!r}).")
        return None
    if kind is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if kind in (str, Path) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # `run_name: 2017` unquoted: the command line would take it as text too
    if kind in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-4 (no dot) as text; accept what the command line would
            return kind(value)
        except ValueError:
            pass
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,), Path: (str,), tuple: (str,)}[kind]
    if isinstance(value, ok) and not (isinstance(value, bool) and kind is not bool):
        return Path(value) if kind is Path else float(value) if kind is float else value
    shown = f"a list ({value})" if isinstance(value, list) else f"a mapping" if isinstance(value, dict) else repr(value)
    problems.append(f"{key}: expected {names[kind]}, got {shown}.")
    return None


def _file_mode(data: dict, problems: list[str]) -> str | None:
    modes = [data["mode"]] if "mode" in data else []
    for name in MODES:
        if name in data:
            if data[name] is not True:
                problems.append(f"{name}: give a mode as `mode: {name}` (or `{name}: true`); got {data[name]!r}.")
            modes.append(name)
    for mode in modes:
        if mode not in MODES:
            problems.append(f"mode: must be one of {', '.join(MODES)}; got {mode!r}.")
    if len(set(modes)) > 1:
        problems.append(f"the file gives more than one mode ({', '.join(map(str, modes))}); keep one.")
    return modes[0] if modes else None


def _unknown_keys(data: dict, is_record: bool) -> list[str]:
    known = set(FIELDS) | set(MODES) | (set(RECORDED_RUN_KEYS) if is_record else set())
    problems = []
    for key in sorted(k for k in data if k not in known):
        close = difflib.get_close_matches(str(key), sorted(FIELDS), n=1)
        problems.append(f"{key}: not a setting{f' (did you mean {close[0]}?)' if close else ''}.")
    if problems:
        problems.append(f"Valid keys are the flags without dashes: mode, {', '.join(k for k in FIELDS if k != 'mode')}.")
    return problems


def apply_config_file(args: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
    """args with every setting of --config that the command line did not give; one error lists every problem."""
    path = Path(args.config)
    data = read_settings_file(path)
    is_record = "library_versions" in data  # a run_config.json that --train wrote
    problems = _unknown_keys(data, is_record)
    if "config" in data:
        problems.append("config: a --config file cannot name another one.")
    mode = _file_mode(data, problems)
    if mode is not None and args.mode is not None and mode != args.mode:
        problems.append(f"mode: the file says {mode} and the command line --{args.mode}; give the mode once "
                        "(remove it from the file, or the flag).")
    values = {}
    for key, value in data.items():
        if key in FIELDS and key != "mode" and not (is_record and key in NOT_RERUN):
            values[key] = _convert(key, value, problems)
    if is_record:
        missing = [k for k in FIELDS if k not in data and k != "mode" and k not in NOT_RERUN and k not in explicit]
        if missing:
            problems.append(f"this run record was written by an older version: it lacks {', '.join(missing)}. Give "
                            f"{' '.join('--' + k for k in missing)} on the command line (or add the keys to the file), so "
                            "the rerun does not silently take today's defaults.")
    if problems:
        raise UserInputError(f"Invalid --config {path}:\n  - " + "\n  - ".join(problems))
    if is_record:
        logger.info("--config %s is a run record: its run_name and resume are not reused (this is a new run%s)", path,
                    "" if "run_name" in explicit else "; --run_name names it")
    merged = vars(args).copy()
    merged.update({k: v for k, v in values.items() if k not in explicit})
    if args.mode is None:
        merged["mode"] = mode
    return argparse.Namespace(**merged)
