"""Shared set-up for tests that train: a small text and a config small enough to run in seconds."""

import time

import torch

from attnlm import run as run_mod
from attnlm.config import build_config

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60))


def text_file(tmp_path, text=TEXT):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.batch_size=4", "train.max_iters=20", "train.eval_interval=10", "train.eval_iters=2",
        "train.log_interval=1", "train.warmup_iters=5", "train.threads=1"]


def tiny_config(source, *overrides):
    return build_config(overrides=[f"data.source={source}", *TINY, *overrides])


def write(path, text):
    """A file at path (its folders made) holding text (str as UTF-8, or bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def train_curve(run):
    """(step, train loss) of every step a run has logged so far."""
    return [(r["step"], r["loss"]) for r in run_mod.read_metrics(run) if "loss" in r]


def wait_for_step(run, step, proc, timeout=90):
    """Until the training process proc has logged `step` steps into run (or fail)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / run_mod.METRICS).exists() and len(train_curve(run)) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"training never reached step {step}: {proc.communicate()}")


def spread(model):
    """An untrained model with every matrix drawn at standard deviation 1: its attention weighs
    on the output (at GPT-2's initialisation the last token alone decides the next, and a cache
    that lost the context would go unseen) and its logits meet no near-ties."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(std=1.0)
    return model
