"""The dispatcher: argument errors are one clean paragraph with exit code 2, every problem reported at once."""

import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from git_qlora_main import build_config, build_parser, main
from utils.dataset_utils import find_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv, needles",
    [
        ([], ["one of the arguments --train --eval --inference --merge_weights --demo is required"]),
        (["--train", "--inference"], ["not allowed with argument"]),
        (["--train", "--batch_size", "many"], ["--batch_size", "invalid int value"]),
        (["--inference"], ["--inference needs exactly one of --test_dir", "--test_image"]),
        (["--eval", "--predictions_file", "p.csv"], ["--eval --predictions_file needs --captions_file"]),
        (["--train"], ["--train requires --train_dir"]),
    ],
)
def test_usage_errors_exit_2_without_traceback(capsys, argv, needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles) and "Traceback" not in err


def test_every_problem_is_reported_together(capsys):
    argv = ["--train", "--train_dir", "d", "--lora_r", "0", "--learning_rate", "-1", "--bnb_4bit_quant_type", "nf8",
            "--merge_dtype", "int4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    for flag in ("--lora_r", "--learning_rate", "--bnb_4bit_quant_type", "--merge_dtype"):
        assert flag in err


def test_config_is_frozen_and_parses_lists():
    config = build_config(build_parser().parse_args(
        ["--train", "--train_dir", "d", "--lora_target_modules", "query, value,fc1", "--fgd_model", "none"]))
    assert config.lora_target_modules == ("query", "value", "fc1")
    assert config.fgd_model is None and config.model_name == "microsoft/git-base"
    with pytest.raises(AttributeError):
        config.lora_r = 3


def test_each_warning_is_logged_once():
    import logging

    from git_qlora_main import OncePerProcess

    once = OncePerProcess()
    record = lambda level, text: logging.LogRecord("x", level, __file__, 1, text, None, None)  # noqa: E731
    assert [once.filter(record(logging.WARNING, "w")) for _ in range(3)] == [True, False, False]
    assert once.filter(record(logging.WARNING, "other")) and once.filter(record(logging.INFO, "i")) and once.filter(record(logging.INFO, "i"))


@pytest.mark.skipif(any(glob.glob(p) for p in ("/dev/nvidia*", "/dev/kfd", "/dev/dri/renderD*", "/dev/accel*")),
                    reason="a GPU device node is present: triton is kept")
def test_without_a_gpu_triton_stays_unloaded_and_the_cpu_compiler_still_works():
    """torch._dynamo asks for triton at import; the CLI's process tells it there is none, and compiling still runs."""
    code = ("import sys, git_qlora_main, torch, torch._dynamo, peft, bitsandbytes\n"
            "from torch.utils._triton import has_triton_package\n"
            "f = torch.compile(lambda x: x.sin() * 2)\n"
            "x = torch.randn(8)\n"
            "assert torch.allclose(f(x), x.sin() * 2)\n"
            "print(sys.modules.get('triton') is None, has_triton_package())\n"
            "import torch.utils.flop_counter\n"
            "try:\n    import torchao.quantization\nexcept ImportError:\n    pass\n")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp()}
    env.pop("GIT_QLORA_KEEP_TRITON", None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "False"]
    # torch's FLOP counter and torchao would each warn that triton is missing: this process's doing, so not said
    assert "triton not found" not in run.stderr and "Detected no triton" not in run.stderr, run.stderr[-2000:]
    kept = subprocess.run([sys.executable, "-c", "import sys, git_qlora_main, torch._dynamo; print('triton' in sys.modules and sys.modules['triton'] is not None)"],
                          capture_output=True, text=True, cwd=ROOT, env={**env, "GIT_QLORA_KEEP_TRITON": "1"}, timeout=600)
    assert kept.stdout.split() == ["True"], kept.stderr[-2000:]


def test_the_command_restarts_itself_once_with_glibcs_huge_page_tunable_and_not_when_told_not_to():
    """Same process id, same arguments; GLIBC_TUNABLES gains the tunable, and a second start does not loop."""
    import git_qlora_main

    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
        if "[never]" in f.read() or not git_qlora_main._glibc_at_least(2, 35):
            pytest.skip("this kernel or glibc offers no transparent huge pages on request")
    code = ("import os, sys, git_qlora_main\n"
            "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)\n"
            "git_qlora_main.restart_with_huge_pages()\n"
            "print('ran on', flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "GIT_QLORA_HUGE_PAGES")}
    run = subprocess.run([sys.executable, "-c", code, "a b"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    first, second, last = run.stdout.splitlines()
    assert first.split()[0] == second.split()[0] and first.endswith("None ['a b']")
    assert second.endswith("glibc.malloc.hugetlb=1 ['a b']") and last == "ran on"
    run = subprocess.run([sys.executable, "-c", code, "x"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**env, "GIT_QLORA_HUGE_PAGES": "0"})
    assert run.stdout.splitlines()[1:] == ["ran on"]


def test_a_folder_run_trains_without_importing_datasets_and_a_dataset_run_still_reads_one(tmp_path, train_cmd, data_dir, tiny_model_dir):
    """In a fresh process (as the CLI runs), --train on a folder leaves `datasets` unloaded and the Trainer still
    trains and saves; --dataset on a JSONL file still loads it."""
    import json

    code = ("import json, sys, git_qlora_main\n"
            "rc = git_qlora_main.main(json.loads(sys.argv[1]))\n"
            "print(rc, sys.modules.get('datasets') is not None)\n")
    env = {k: v for k, v in os.environ.items() if k != "GIT_QLORA_KEEP_DATASETS"}
    folder = train_cmd(tmp_path, "folder", "--max_steps", "2")
    run = subprocess.run([sys.executable, "-c", code, json.dumps(folder)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.stdout.split()[-2:] == ["0", "False"], run.stderr[-3000:]
    assert (tmp_path / "folder" / "final_model" / "adapter_model.safetensors").is_file()
    rows = [{"image": str(data_dir / "train" / name), "text": "a red circle"} for name in sorted(find_images(data_dir / "train"))[:8]]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    hub = ["--train", "--dataset", str(tmp_path / "data.jsonl"), "--model_name", str(tiny_model_dir), "--output_dir", str(tmp_path),
           "--run_name", "jsonl", "--batch_size", "4", "--num_workers", "0", "--fgd_model", "none", "--java", "none",
           "--max_new_tokens", "4", "--max_steps", "1"]
    run = subprocess.run([sys.executable, "-c", code, json.dumps(hub)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.stdout.split()[-2:] == ["0", "True"], run.stderr[-3000:]


def test_the_modes_imports_run_without_full_garbage_collections_and_their_objects_are_frozen(train_cmd, tmp_path):
    """In a fresh process: no full collection while the mode imports torch, transformers and PEFT; then what the
    imports made is frozen (out of every later collection) and the collector is on; after main, both undone."""
    import json

    code = (
        "import gc, json, sys, git_qlora_main\n"
        "full, seen = [], {}\n"
        "gc.callbacks.append(lambda phase, info: full.append(1) if phase == 'start' and info['generation'] == 2 else None)\n"
        "original = git_qlora_main.imported_without_garbage_collection\n"
        "def check():\n"
        "    seen.update(full=len(full), imported=all(m in sys.modules for m in ('torch', 'transformers', 'peft')))\n"
        "    original()\n"
        "    seen.update(frozen=gc.get_freeze_count(), enabled=gc.isenabled())\n"
        "    raise KeyboardInterrupt  # the mode itself need not run\n"
        "git_qlora_main.imported_without_garbage_collection = check\n"
        "rc = git_qlora_main.main(json.loads(sys.argv[1]))\n"
        "print(json.dumps({**seen, 'rc': rc, 'enabled_after': gc.isenabled(), 'frozen_after': gc.get_freeze_count()}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code, json.dumps(train_cmd(tmp_path, "gc"))], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, env={**os.environ, "GIT_QLORA_HUGE_PAGES": "0"})
    seen = json.loads(run.stdout.splitlines()[-1])
    assert seen["imported"] and seen["full"] == 0, seen  # 8-11 full collections with the collector on
    assert seen["frozen"] > 100_000 and seen["enabled"], seen
    assert seen["rc"] == 130 and seen["enabled_after"] and seen["frozen_after"] == 0, seen


def test_meteor_starts_before_anything_imports_torch(tmp_path):
    """METEOR's 10-30 s Java start overlaps the whole import of the stack: the command starts it before its
    validation or logging set-up import torch (which would take 2-3 s first)."""
    code = ("import sys, git_qlora_main, utils.java_scorers as java\n"
            "def start(java_path):\n"
            "    print('torch imported:', 'torch' in sys.modules, 'java:', java_path, flush=True)\n"
            "    raise KeyboardInterrupt  # the command itself need not run\n"
            "java.start_meteor = start\n"
            "print('rc', git_qlora_main.main(sys.argv[1:]))\n")
    run = subprocess.run([sys.executable, "-c", code, "--eval", "--model_name", str(tmp_path), "--test_dir", str(tmp_path),
                          "--captions_file", str(tmp_path / "captions.csv"), "--output_dir", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "GIT_QLORA_HUGE_PAGES": "0"})
    assert "torch imported: False java: java" in run.stdout and "rc 130" in run.stdout, run.stdout + run.stderr[-2000:]


def test_the_script_leaves_the_imports_frozen_until_the_process_ends(trained_run, data_dir):
    """Run as a program, the imports' objects stay frozen after the command (atexit sees them frozen), so the
    interpreter's collections at exit skip them; main called in-process unfreezes them
    (test_the_modes_imports_run_without_full_garbage_collections_and_their_objects_are_frozen)."""
    image = next((data_dir / "test").glob("*.png"))
    code = ("import atexit, gc, runpy, sys\n"
            "atexit.register(lambda: print('frozen at exit', gc.get_freeze_count(), flush=True))\n"
            "sys.argv = ['git_qlora_main.py', *sys.argv[1:]]\n"
            "runpy.run_path('git_qlora_main.py', run_name='__main__')\n")
    args = ["--inference", "--test_image", str(image), "--output_dir", str(trained_run), "--max_new_tokens", "4"]
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "GIT_QLORA_HUGE_PAGES": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    frozen = int(run.stdout.split("frozen at exit")[-1].split()[0])
    assert frozen > 100_000, run.stdout[-2000:]


def test_the_note_that_a_4bit_base_was_dequantized_as_asked_is_not_logged(tiny_model_dir, capfd, caplog):
    """Captioning on a bf16 CPU dequantizes the 4-bit base on purpose (models/git_qlora.py); transformers' note
    that it did is dropped, and its other lines are not."""
    import logging

    import torch

    from git_qlora_main import setup_logging
    from models.git_qlora import load_base_model
    from utils.config import Config

    setup_logging()
    logging.Logger.warning_once.cache_clear()  # transformers says it once per process: make this call the first
    load_base_model(Config(mode="inference", model_name=str(tiny_model_dir)), "cpu").dequantize(dtype=torch.bfloat16)
    logging.getLogger("transformers.integrations.bitsandbytes").warning("another line of that module")
    said = capfd.readouterr().err + caplog.text
    assert "dequantized in" not in said and "another line of that module" in said
