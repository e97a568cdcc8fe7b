"""Data-parallel overhead on the CPU: the shakespeare_char recipe trained by 2 processes of 1 thread
(torchrun, gloo, DDP) against 1 process of 2 threads, the same 12 sequences a step (6 a process
against 12), whole commands timed. Prints one JSON line per run and one with the ratio of the
job's tokens/s (2 processes / 1 process) and the final train losses, which agree to float
reduction order.

Alone on a machine: flock /tmp/bench.lock python benchmarks/data_parallel.py [--data FILE]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(command, env, out):
    tick = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - tick
    summary = json.loads((Path(out) / "summary.json").read_text())
    return {"tokens_per_s": round(summary["tokens_per_s"]), "train_loss": round(summary["train_loss"], 4),
            "wall_s": round(wall, 1), "world_size": summary["world_size"],
            "sequences_per_step": summary["sequences_per_step"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data/tinyshakespeare/input.txt"))
    parser.add_argument("--iters", type=int, default=500)
    args = parser.parse_args()
    if not os.path.exists(args.data):
        emit(benchmark="data_parallel", skipped=f"no data at {args.data}; run data/fetch.py")
        return
    common = ["--config", "shakespeare_char", "--quiet", "--set", f"data.source={args.data}",
              "--set", f"train.max_iters={args.iters}", "--set", "train.eval_interval=100000"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        one = run([sys.executable, "-m", "attnlm", "train", *common, "--set", "train.threads=2",
                   "--out", f"{tmp}/one"], env, f"{tmp}/one")
        emit(benchmark="data_parallel", processes=1, threads_each=2, **one)
        two = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", "-m", "attnlm", "train", *common,
                   "--set", "train.batch_size=6", "--set", "train.threads=1", "--out", f"{tmp}/two"],
                  {**env, "OMP_NUM_THREADS": "1"}, f"{tmp}/two")
        emit(benchmark="data_parallel", processes=2, threads_each=1, **two)
    emit(benchmark="data_parallel_ratio", iters=args.iters,
         two_processes_over_one=round(two["tokens_per_s"] / one["tokens_per_s"], 3),
         train_loss_one=one["train_loss"], train_loss_two=two["train_loss"])


if __name__ == "__main__":
    main()
