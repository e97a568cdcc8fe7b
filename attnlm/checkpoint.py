"""Checkpoints: written atomically, loaded without executing anything, with a format version.

A checkpoint holds the resolved config and tokenizer state beside the weights, so it alone
rebuilds the model.
"""

import dataclasses
import os
from pathlib import Path

import torch

from attnlm import config as config_mod
from attnlm import tokenizer as tokenizer_mod
from attnlm.attention import BACKENDS, check_backend
from attnlm.errors import AttnlmError, InputError

FORMAT_VERSION = 1
FILENAME = "checkpoint.pt"


def save(payload, path):
    """Write to a temporary file in the same folder, flush it to disk, then rename it over the
    old one: a crash at any moment leaves either the old or the new checkpoint, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT_VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_rotating(payload, run_dir, step, keep_last=0):
    """Save the run's checkpoint.pt; with keep_last > 0 also keep the last N as
    checkpoints/step-NNNNNNN.pt (hard links to the same bytes: no extra disk)."""
    run_dir = Path(run_dir)
    save(payload, run_dir / FILENAME)
    if keep_last:
        folder = run_dir / "checkpoints"
        folder.mkdir(exist_ok=True)
        kept = folder / f"step-{step:07d}.pt"
        kept.unlink(missing_ok=True)
        os.link(run_dir / FILENAME, kept)
        for old in sorted(folder.glob("step-*.pt"))[:-keep_last]:
            old.unlink()


def checkpoint_path(run):
    """The checkpoint of a run directory, or a checkpoint file itself."""
    path = Path(run)
    if path.is_dir():
        path = path / FILENAME
        if not path.exists():
            raise InputError(f"{run} holds no {FILENAME} (is it a run directory?)")
    elif not path.exists():
        raise InputError(f"{run}: no such run directory or checkpoint")
    return path


def load(path):
    """A checkpoint's contents, with tensors on the CPU. weights_only: nothing in it can run code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AttnlmError(f"{path} is not a readable attnlm checkpoint ({reason[:200]})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise AttnlmError(f"{path} is not an attnlm checkpoint")
    if ckpt["format"] != FORMAT_VERSION:
        raise AttnlmError(f"{path} has checkpoint format {ckpt['format']!r}; this attnlm reads "
                          f"format {FORMAT_VERSION}")
    return ckpt


def load_model(run, device="cpu"):
    """(model in eval mode, tokenizer, config, checkpoint) from a run directory or checkpoint."""
    from attnlm.model import GPT

    ckpt = load(checkpoint_path(run))
    cfg = config_mod.from_dict(ckpt["config"])
    tokenizer = tokenizer_mod.from_state(ckpt["tokenizer"])
    rows = ckpt["model"]["tok_emb.weight"].size(0)
    if rows != tokenizer.vocab_size:
        raise InputError(f"{run}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"was trained on {rows}; they do not belong together")
    if BACKENDS[cfg.model.attention].cuda_only and torch.device(device).type != "cuda":
        # Same algorithm, same numbers: a model trained with a CUDA kernel still runs on the CPU.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="tiled"))
    check_backend(cfg.model.attention, torch.device(device))
    model = GPT(cfg.model, tokenizer.vocab_size)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise AttnlmError(f"{run}: weights do not fit the saved config ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer, cfg, ckpt
