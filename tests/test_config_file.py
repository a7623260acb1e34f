"""--config FILE (YAML/JSON) under the command line, run_config.json as a config, the examples, and --help's defaults."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from git_qlora_main import build_config, build_parser, main
from utils.config import DERIVED_FIELDS, Config
from utils.config_file import RECORDED_RUN_KEYS, apply_config_file, explicit_flags, flag_value

REPO = Path(__file__).resolve().parents[1]


def config_from(argv: list[str]) -> Config:
    """What main() builds from argv, without running the mode."""
    args = build_parser().parse_args(argv)
    if args.config is not None:
        args = apply_config_file(args, explicit_flags(build_parser(), argv))
    return build_config(args)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_file_fills_unset_flags_and_the_command_line_wins_even_at_its_default(tmp_path):
    cfg = write(tmp_path / "run.yaml", "mode: train\ntrain_dir: imgs\nlora_r: 8\nlearning_rate: 1e-3\nseed: 7\n"
                "lora_target_modules: [query, value]\nreport_to: [tensorboard]\nbnb_4bit_use_double_quant: false\n")
    config = config_from(["--config", str(cfg), "--seed", "42", "--lora_r", "4"])
    # --seed 42 is the default, yet it was typed: it overrides the file's 7.
    assert (config.seed, config.lora_r, config.learning_rate) == (42, 4, 1e-3)
    assert config.lora_target_modules == ("query", "value") and config.train_dir == Path("imgs")
    assert config.bnb_4bit_use_double_quant is False and config.mode == "train"
    assert config.batch_size == Config.batch_size  # neither file nor command line: Config's default


def test_json_file_and_mode_as_flag_name(tmp_path):
    cfg = write(tmp_path / "run.json", json.dumps({"train": True, "train_dir": "imgs", "epochs": 2, "run_name": 2017}))
    config = config_from(["--config", str(cfg)])
    assert (config.mode, config.epochs, config.run_name) == ("train", 2.0, "2017")


@pytest.mark.parametrize(
    "text, argv, needles",
    [
        ("train_dir: d\nlora_rank: 8\n", ["--train"], ["lora_rank", "did you mean lora_r", "Valid keys", "lora_alpha"]),
        ("train_dir: d\nlora_r: [8, 16]\n", ["--train"], ["lora_r: expected a whole number, got a list ([8, 16])"]),
        ("train_dir: d\nlearning_rate: fast\n", ["--train"], ["learning_rate: expected a number"]),
        ("train_dir: d\nstreaming: 1\n", ["--train"], ["streaming: expected true or false"]),
        ("train_dir: d\n\tlora_r: 8\n", ["--train"], ["not valid YAML", "line 2", "tabs"]),
        ("mode: train\ntrain_dir: d\n", ["--eval"], ["mode: the file says train and the command line --eval"]),
        ("- lora_r\n", ["--train"], ["must hold a mapping"]),
        ("config: other.yaml\n", ["--train"], ["cannot name another"]),
    ],
)
def test_bad_config_files_are_one_clean_error(tmp_path, capsys, text, argv, needles):
    cfg = write(tmp_path / "bad.yaml", text)
    out = tmp_path / "out"
    assert main([*argv, "--config", str(cfg), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert "Traceback" not in err and not out.exists()


def test_missing_config_file_and_missing_mode(tmp_path, capsys):
    assert main(["--train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    cfg = write(tmp_path / "nomode.yaml", "train_dir: d\n")
    assert main(["--config", str(cfg)]) == 2
    assert "one of the arguments --train --eval" in capsys.readouterr().err


def record(**changes) -> dict:
    """A run_config.json as --train writes it: every flag plus the recorded-only keys."""
    settings = Config(mode="train", train_dir=Path("imgs"), run_name="r1").to_json_dict()
    settings.update({key: None for key in RECORDED_RUN_KEYS}, library_versions={"torch": "2"})
    settings.update(changes)
    return settings


def test_old_run_records_name_their_missing_and_unknown_keys(tmp_path, capsys):
    old = record()
    del old["lora_dropout"], old["report_to"]
    cfg = write(tmp_path / "run_config.json", json.dumps(old))
    assert main(["--train", "--config", str(cfg), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "lacks lora_dropout, report_to" in err and "--lora_dropout --report_to" in err
    # Given on the command line, the missing keys are no longer missing.
    config = config_from(["--train", "--config", str(cfg), "--lora_dropout", "0.1", "--report_to", "none"])
    assert config.lora_dropout == 0.1 and config.report_to == ("none",)
    cfg = write(tmp_path / "run_config.json", json.dumps(record(lora_bias="none")))
    assert main(["--train", "--config", str(cfg)]) == 2
    assert "lora_bias: not a setting" in capsys.readouterr().err


def test_a_run_record_starts_a_new_run(tmp_path):
    cfg = write(tmp_path / "run_config.json", json.dumps(record(resume=True, lora_r=4)))
    config = config_from(["--train", "--config", str(cfg)])
    assert config.run_name is None and config.resume is False and config.lora_r == 4  # a timestamp names it later


def test_rerun_from_run_config_with_one_change(trained_run, tmp_path, data_dir):
    """The issue's command: --train --config RUN/run_config.json --run_name r2 --learning_rate 1e-4."""
    out = tmp_path / "runs"
    argv = ["--train", "--config", str(trained_run / "run_config.json"), "--run_name", "r2-rerun",
            "--learning_rate", "1e-4", "--max_steps", "2", "--output_dir", str(out)]
    assert main(argv) == 0
    first = json.loads((trained_run / "run_config.json").read_text())
    second = json.loads((out / "r2-rerun" / "run_config.json").read_text())
    changed = {k for k in set(first) | set(second) if first.get(k) != second.get(k)}
    assert changed <= {"run_name", "learning_rate", "max_steps", "output_dir", "created", "resumes"}, changed
    assert second["learning_rate"] == 1e-4 and second["lora_r"] == first["lora_r"] == 8


def test_every_key_of_a_real_run_config_is_a_flag_or_recorded(trained_run):
    """A key added to write_run_config must join RECORDED_RUN_KEYS, or reruns from run_config.json break."""
    settings = json.loads((trained_run / "run_config.json").read_text())
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(settings) - fields - set(RECORDED_RUN_KEYS) == set()


@pytest.mark.parametrize("name", ["image_folder.yaml", "hub_dataset.yaml", "webdataset_torchrun.yaml"])
def test_examples_load_into_a_valid_config(name, monkeypatch):
    if name == "hub_dataset.yaml":  # it reports to MLflow: the package and a tracking server, as its comment says
        pytest.importorskip("mlflow", reason="mlflow-skinny (requirements-dev.txt) is not installed")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    config = config_from(["--config", str(REPO / "examples" / name)])
    assert config.mode == "train"
    if name == "image_folder.yaml":
        assert config.early_stopping_patience == 3 and config.learning_rate == 2e-4
    if name == "hub_dataset.yaml":
        assert config.dataset == "lambdalabs/pokemon-blip-captions" and config.report_to == ("tensorboard", "mlflow")
    if name == "webdataset_torchrun.yaml":
        assert config.streaming and config.max_steps == 20000 and config.dataset == "laion_out/*.tar"


def help_entries(text: str) -> dict[str, str]:
    """{flag: its help text, wrapped lines joined}, read from the printed --help (each option starts at indent 2)."""
    entries, flag = {}, None
    for line in text[text.index("options:"):].splitlines():
        start = re.match(r"  (--[a-z0-9_]+)", line)
        if start:
            flag = start.group(1)[2:]
            entries[flag] = line
        elif flag is not None and line.startswith("   "):
            entries[flag] += " " + line
        else:
            flag = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_shows_every_default_and_it_is_configs(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    entries = help_entries(capsys.readouterr().out)
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    flags = [a.dest for a in build_parser()._actions if a.option_strings and a.dest not in ("help", "mode", "config")]
    assert set(flags) == set(fields) - {"mode", *DERIVED_FIELDS}
    for flag in flags:
        found = re.search(r"\(default: ([^;)]*)", entries[flag])
        assert found or "default" in entries[flag], f"--{flag} shows no default: {entries[flag]}"
        if fields[flag] is not None:
            assert found and found.group(1).strip() == str(flag_value(fields[flag])), (flag, entries[flag], fields[flag])
    # A few read by eye, so the parsing above cannot fool itself.
    assert "(default: 16)" in entries["lora_r"] and "(default: query,key,value,dense)" in entries["lora_target_modules"]
    assert "(default: True)" in entries["bnb_4bit_use_double_quant"] and "(default: results;" in entries["output_dir"]
    assert "AVX-512 BF16 or AMX" in entries["bnb_4bit_compute_dtype"]  # the rule models/git_qlora.py applies
