"""Training throughput and quality of the shakespeare_char recipe on Tiny Shakespeare.

Prints one JSON line per run: tokens/s over the training steps alone (evaluation and checkpoints
excluded) and the final loss over the whole val split. Then the same for the published recipe's
model (learned positions, float32, sdpa), and the ratio of the two throughputs: this machine's
speed drifts by a quarter over minutes, so the ratio, measured in one run, is the figure to
compare. Needs the text: data/fetch.py gets it, or pass --data PATH.
Usage: python benchmarks/train_shakespeare.py [--data PATH] [--threads N] [--no-reference]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from attnlm.run import load_model  # noqa: E402
from attnlm.config import load_config  # noqa: E402
from attnlm.data import prepare_training  # noqa: E402
from attnlm.evaluate import split_loss  # noqa: E402
from attnlm.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ["model.pos=learned", "model.attention=sdpa", "train.dtype=float32"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data/tinyshakespeare/input.txt"))
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override, e.g. model.attention=naive")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the published recipe's run")
    args = parser.parse_args()
    if not os.path.exists(args.data):
        emit(benchmark="train_shakespeare", skipped=f"no data at {args.data}; run data/fetch.py")
        return
    ours = measure(args, args.overrides)
    if args.reference:
        published = measure(args, PUBLISHED + args.overrides)
        emit(benchmark="train_shakespeare_ratio",
             speedup=round(ours["tokens_per_s"] / published["tokens_per_s"], 3),
             val_loss=ours["val_loss_whole_split"], published_val_loss=published["val_loss_whole_split"])


def measure(args, overrides):
    cfg = load_config("shakespeare_char",
                      [f"data.source={args.data}", f"train.threads={args.threads}",
                       "train.eval_interval=100000", *overrides])
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = train(cfg, out, quiet=True)
        wall = time.perf_counter() - start
        model, tokenizer, cfg, _ = load_model(out)
        val = prepare_training(cfg, tokenizer)[1]["val"]
        # In float32 whatever the training dtype: the weights' quality, not a rounding's.
        val_loss = split_loss(model, val, cfg.model.block_size, 64, next(model.parameters()).device)
    record = dict(iters=summary["steps"], tokens_per_s=round(summary["tokens_per_s"]),
                  val_loss_whole_split=round(val_loss, 4), train_loss=round(summary["train_loss"], 4),
                  wall_s=round(wall, 1), overrides=overrides)
    emit(benchmark="train_shakespeare", **record)
    return record


if __name__ == "__main__":
    main()
