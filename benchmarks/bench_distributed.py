"""Single- vs multi-process throughput of --train and --inference --test_dir through the real CLI (torchrun).

Builds the demo-sized random GIT (hidden 128, 2+2 layers, 64 px) and generated pictures, then runs each
mode with 1 process (all threads) and with --nproc processes (threads split between them), e.g.
    python benchmarks/bench_distributed.py --nproc 2 --threads 2
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.small_git import SmallGitSize, build_small_git  # noqa: E402
from utils.demo_data import every_caption, write_demo_dataset  # noqa: E402


def run(args: list[str], nproc: int, threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // nproc)), HF_HUB_OFFLINE="1")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    done = subprocess.run([*launcher, "git_qlora_main.py", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    return done.stderr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--images", type=int, default=480)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    model = build_small_git(root / "model", every_caption(), SmallGitSize(), seed=0)
    data = write_demo_dataset(root / "data", train_count=args.images, test_count=8, seed=1, size=64)
    results = {}
    for nproc in (1, args.nproc):
        out = root / f"runs{nproc}"
        run(["--train", "--train_dir", str(data / "train"), "--captions_file", str(data / "captions.csv"),
             "--model_name", str(model), "--output_dir", str(out), "--run_name", "r", "--split_ratio", "0",
             "--batch_size", str(args.batch_size), "--max_steps", str(args.steps), "--num_workers", "0",
             "--fgd_model", "none"], nproc, args.threads)
        metrics = json.loads((out / "r" / "metrics.json").read_text())
        log = run(["--inference", "--test_dir", str(data / "train"), "--output_dir", str(out / "r"),
                   "--batch_size", str(args.batch_size), "--max_new_tokens", "20", "--num_workers", "0"],
                  nproc, args.threads)
        caption_rate = float(re.search(r"process\(es\), ([\d.]+) images/s", log).group(1))
        results[nproc] = {"train_images_per_second": round(metrics["train_images_per_second"], 1),
                          "seconds_per_step": round(metrics["seconds_per_step"], 4),
                          "caption_images_per_second": caption_rate}
        print(nproc, "process(es):", results[nproc], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
