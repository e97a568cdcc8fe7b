"""Time to a target loss on Tiny Shakespeare (characters): the shakespeare_fast recipe against
the published recipe's model (learned positions, float32, sdpa, 2,000 steps), and the
shakespeare_char recipe, each as a whole `attnlm train` command (Python start-up, data
preparation, compilation and evaluations included), one after the other in this invocation.
Each is first run for one untimed step, so that one-off work a user's later runs skip (encoding
the text into the token cache, measuring the matmul peak) lands on neither side of the ratio.
With --repeats N each command is timed N times, in rounds that take every run in turn (so that a
slow stretch of a shared machine falls on all of them alike), and each keeps its fastest: others'
work only ever adds time. Training is deterministic for a seed, so every repeat's loss is the
same; the line gives each repeat's wall time and loss, and the worst loss.

Prints one JSON line per run: the command's wall seconds, tokens/s over its steps, and the loss
over the whole val split (in float32, whatever the training dtype); then the fast recipe's wall
time over the published one's (the goal: at most 0.25, with val loss <= 1.88). With --plot FILE,
the loss against wall time of the runs (attnlm plot --x time). Needs the text: data/fetch.py
gets it, or pass --data PATH. Alone on a machine:
    flock -x /tmp/bench.lock python benchmarks/train_shakespeare.py --threads 2 [--plot FILE]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from attnlm.data import prepare_training  # noqa: E402
from attnlm.evaluate import split_loss  # noqa: E402
from attnlm.run import load_model, read_summary  # noqa: E402
from attnlm.runtime import set_threads  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.88
RUNS = {
    "published": ["--config", "shakespeare_char", "--set", "model.pos=learned",
                  "--set", "model.attention=sdpa", "--set", "train.dtype=float32"],
    "shakespeare_char": ["--config", "shakespeare_char"],
    "shakespeare_fast": ["--config", "shakespeare_fast"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data/tinyshakespeare/input.txt"))
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override for every run, e.g. train.max_iters=500")
    parser.add_argument("--plot", metavar="FILE.png", help="write the loss against wall time")
    parser.add_argument("--repeats", type=at_least_one, default=1, metavar="N",
                        help="time each command N times, in alternating rounds; keep the fastest")
    args = parser.parse_args()
    if not os.path.exists(args.data):
        emit(benchmark="train_shakespeare", skipped=f"no data at {args.data}; run data/fetch.py")
        return
    set_threads(args.threads)  # the training runs' count: each line's `threads` reports it
    with tempfile.TemporaryDirectory() as folder:
        for name in args.only:
            warm_up(args, name, Path(folder) / "warm" / name)
        runs = {name: [] for name in args.only}  # (wall seconds, run directory) per repeat
        for round_ in range(args.repeats):
            for name in args.only:
                out = Path(folder) / f"round{round_}" / name
                runs[name].append((timed(args, name, out), out))
        records = {name: record(args, name, runs[name]) for name in args.only}
        if args.plot:  # each run's fastest repeat, under the run's name (the plot's label)
            fastest = [min(runs[name])[1].rename(Path(folder) / name) for name in records]
            subprocess.run([sys.executable, "-m", "attnlm", "plot", *map(str, fastest),
                            "--x", "time", "--out", args.plot], check=True)
    if {"published", "shakespeare_fast"} <= records.keys():
        fast, published = records["shakespeare_fast"], records["published"]
        ratio = fast["wall_s"] / published["wall_s"]
        emit(benchmark="train_shakespeare_time_to_loss", wall_ratio=round(ratio, 3),
             val_loss=fast["val_loss_whole_split"], target=TARGET,
             met=bool(ratio <= 0.25 and fast["val_loss_whole_split"] <= TARGET))


def at_least_one(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def command(args, name, out):
    return [sys.executable, "-m", "attnlm", "train", *RUNS[name], "--out", str(out), "--quiet",
            "--set", f"data.source={args.data}", "--set", f"train.threads={args.threads}",
            *(item for o in args.overrides for item in ("--set", o))]


def warm_up(args, name, out):
    """One step, untimed: the token cache and the matmul peak of the run's dtype and threads are
    then filled, so that no command of the ratio pays for them (a user's second run does not).
    The later --set wins."""
    subprocess.run([*command(args, name, out), "--set", "train.max_iters=1"], check=True,
                   stdout=subprocess.DEVNULL)


def timed(args, name, out):
    """The command's wall seconds."""
    tick = time.perf_counter()
    subprocess.run(command(args, name, out), check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - tick


def record(args, name, runs):
    """The line of one run: its fastest repeat, and the worst val loss of any."""
    wall, out = min(runs)
    summary = read_summary(out)
    losses = [val_loss(run_dir) for _, run_dir in runs]
    record = dict(run=name, wall_s=round(wall, 1), wall_s_each=[round(w, 1) for w, _ in runs],
                  steps=summary["steps"], tokens_per_s=round(summary["tokens_per_s"]),
                  val_loss_whole_split=round(max(losses), 4),
                  val_loss_each=[round(loss, 4) for loss in losses],
                  utilisation=summary["utilisation"] and round(summary["utilisation"], 3),
                  compile_s=summary["compile_s"], overrides=args.overrides)
    emit(benchmark="train_shakespeare", **record)
    return record


def val_loss(out):
    """The loss of a run's model over the whole val split, in float32 whatever the training dtype:
    the weights' quality, not a rounding's."""
    model, tokenizer, cfg, _ = load_model(out)
    val = prepare_training(cfg, tokenizer)[1]["val"]
    return split_loss(model, val, cfg.model.block_size, 64, next(model.parameters()).device)


if __name__ == "__main__":
    main()
