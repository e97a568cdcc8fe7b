"""The attention variants side by side: the same model, steps and tokens, one setting changed.

Prints one JSON line per variant: val loss over the whole val split, training tokens/s (evaluation
and checkpoints excluded), parameters and the KV cache's bytes per token. The base is the
shakespeare_char recipe with 8 heads (so that n_kv_head = n_head/4 and 1 differ), trained
--steps steps. Runs one after another, never two at once.
Usage: python benchmarks/variants.py [--data PATH] [--steps N] [--threads N] [--only NAME,...]
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from attnlm.config import load_config  # noqa: E402
from attnlm.data import prepare_training  # noqa: E402
from attnlm.evaluate import split_loss  # noqa: E402
from attnlm.model import kv_heads  # noqa: E402
from attnlm.run import load_model  # noqa: E402
from attnlm.train import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE = ["model.n_head=8"]
VARIANTS = {
    "baseline": [],
    "gqa-n_head/4": ["model.n_kv_head=2"],
    "mqa": ["model.n_kv_head=1"],
    "window-32": ["model.window=32"],
    "SSSL-32": ["model.window=32", "model.window_pattern=SSSL"],
    "qk-norm": ["model.qk_norm=true"],
    "softcap-30": ["model.softcap=30"],
    "llama": ["model.pos=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.n_kv_head=2"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data/tinyshakespeare/input.txt"),
                        help="a text file, or builtin:pydoc")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra config override for every variant, e.g. model.attention=tiled")
    args = parser.parse_args()
    if not args.data.startswith("builtin:") and not os.path.exists(args.data):
        emit(benchmark="variants", skipped=f"no data at {args.data}; run data/fetch.py")
        return
    names = args.only.split(",") if args.only else list(VARIANTS)
    for name in names:
        emit(benchmark="variants", variant=name, **measure(args, VARIANTS[name]))


def measure(args, variant):
    overrides = [f"data.source={args.data}", f"train.threads={args.threads}",
                 f"train.max_iters={args.steps}", f"train.eval_interval={args.steps}",
                 *BASE, *variant, *args.overrides]
    cfg = load_config("shakespeare_char", overrides)
    with tempfile.TemporaryDirectory() as out:
        summary = train(cfg, out, quiet=True)
        model, tokenizer, cfg, _ = load_model(out)
        val = prepare_training(cfg, tokenizer)[1]["val"]
        val_loss = split_loss(model, val, cfg.model.block_size, 64, model.tok_emb.weight.device)
    m = cfg.model
    kv_bytes = 2 * m.n_layer * kv_heads(m) * (m.n_embd // m.n_head) * 4  # float32 keys and values
    base = {"recipe": "shakespeare_char", "overrides": [*BASE, *args.overrides], "pos": m.pos,
            "attention": m.attention, "dtype": cfg.train.dtype}  # what the variant changes
    return {"settings": variant, "base": base, "steps": args.steps, "val_loss_whole_split": round(val_loss, 4),
            "tokens_per_s": round(summary["tokens_per_s"]), "params": model.num_params(),
            "kv_cache_bytes_per_token": kv_bytes}


if __name__ == "__main__":
    main()
