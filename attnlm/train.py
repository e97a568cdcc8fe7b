"""The training loop: teacher forcing, AdamW, warmup + cosine schedule, periodic eval and
checkpoints, exact resume, graceful interruption."""

import contextlib
import fcntl
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from attnlm import checkpoint, config as config_mod, tokenizer as tokenizer_mod
from attnlm.attention import check_backend
from attnlm.data import BatchSampler, need_tokens, prepare_training
from attnlm.errors import AttnlmError, InputError
from attnlm.evaluate import split_loss
from attnlm.model import GPT
from attnlm.runtime import autocast, resolve_device, set_threads, slow_dtype_warning


class Interrupted(AttnlmError):
    exit_code = 130


def lr_at(step, t):
    """Linear warmup to t.lr, cosine decay to t.min_lr at lr_decay_iters, then flat."""
    decay_end = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if step >= decay_end:
        return t.min_lr
    progress = (step - t.warmup_iters) / max(decay_end - t.warmup_iters, 1)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def make_optimizer(model, t, device):
    """AdamW with weight decay on matrices only (not on biases, norms' gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)


@contextlib.contextmanager
def run_lock(out):
    """One process per run directory: a second one is refused rather than interleaving files."""
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{out} is in use by another attnlm process") from None
        yield


@contextlib.contextmanager
def deferred_interrupts():
    """Ctrl-C and SIGTERM set a flag; the loop finishes its step, saves, then stops."""
    flag = {"signal": None}

    def handler(signum, frame):
        if flag["signal"] is not None:  # asked twice: stop now; the last checkpoint stands
            raise KeyboardInterrupt
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_config(out, yaml_doc, overrides):
    """The saved config of a run with new overrides on top (e.g. more train.max_iters); the
    model, tokenizer and data must stay as they were."""
    saved = config_mod.from_dict(checkpoint.load(checkpoint.checkpoint_path(out))["config"])
    cfg = config_mod.build_config(yaml_doc, overrides, base=saved)
    for section in ("model", "tokenizer", "data"):
        if getattr(cfg, section) != getattr(saved, section):
            raise InputError(f"cannot change the {section} section when resuming {out}")
    return cfg


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step or evaluation."""

    def __init__(self, path, keep_until=None):
        self.path = path
        if keep_until is not None and path.exists():  # drop what came after the checkpoint
            lines = [l for l in path.read_text().splitlines() if l.strip()]
            kept = [l for l in lines if json.loads(l)["step"] <= keep_until]
            path.write_text("".join(l + "\n" for l in kept))

    def write(self, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def train(cfg, out, resume=False, quiet=False):
    """Train per cfg into run directory `out`; returns the summary (also in summary.json)."""
    out = Path(out)
    if not resume and (out / checkpoint.FILENAME).exists():
        raise InputError(f"{out} already holds a run; pass --resume to continue it or choose "
                         "another --out")
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out), deferred_interrupts() as interrupt:
        return _train(cfg, out, resume, quiet, interrupt)


def _train(cfg, out, resume, quiet, interrupt):
    t, m = cfg.train, cfg.model
    set_threads(t.threads)
    device = resolve_device(t.device)
    check_backend(m.attention, device)
    amp = autocast(device, t.dtype)  # validates dtype against the device up front
    if not quiet and (warning := slow_dtype_warning(device, t.dtype)):
        print(warning, file=sys.stderr)
    torch.manual_seed(t.seed)
    ckpt = checkpoint.load(out / checkpoint.FILENAME) if resume else None
    tokenizer = tokenizer_mod.from_state(ckpt["tokenizer"]) if ckpt else None
    tokenizer, splits = prepare_training(cfg, tokenizer, progress=not quiet)
    need_tokens(splits["train"], "train", m.block_size)
    need_tokens(splits["val"], "val", m.block_size)

    model = GPT(m, tokenizer.vocab_size).to(device)
    optimizer = make_optimizer(model, t, device)
    scaler = torch.amp.GradScaler(device.type, enabled=t.dtype == "float16")
    sampler = BatchSampler(splits["train"], m.block_size, t.batch_size, t.seed, device)
    step, best_val = 0, float("inf")
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
    else:
        config_mod.dump_yaml(cfg, out / "config.yaml")
        tokenizer_mod.save(tokenizer, out / "tokenizer.json")
    metrics = MetricsLog(out / "metrics.jsonl", keep_until=step)

    def save():
        checkpoint.save_rotating({
            "config": config_mod.to_dict(cfg), "tokenizer": tokenizer.state(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(), "rng": {"torch": torch.get_rng_state()},
            "step": step, "best_val_loss": best_val,
        }, out, step, t.keep_last)

    def evaluate():
        return split_loss(model, splits["val"], m.block_size, t.batch_size, device, t.dtype,
                          max_batches=t.eval_iters, seed=t.seed)

    tokens_per_step = t.batch_size * t.grad_accum * m.block_size
    show_bar = not quiet and sys.stderr.isatty()
    bar = tqdm(total=t.max_iters, initial=step, disable=not show_bar, unit="step", dynamic_ncols=True)
    say = (lambda msg: None) if quiet else tqdm.write if show_bar else (lambda msg: print(msg, file=sys.stderr))
    train_time, start_step, loss_value, val_loss = 0.0, step, float("nan"), None
    model.train()
    while step < t.max_iters:
        if interrupt["signal"] is not None:
            save()
            bar.close()
            raise Interrupted(f"interrupted at step {step}; checkpoint saved, continue with --resume")
        tick = time.perf_counter()
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_value = 0.0
        for _ in range(t.grad_accum):
            x, y = sampler.next()
            try:
                with amp:
                    _, loss = model(x, y)
                scaler.scale(loss / t.grad_accum).backward()
            except torch.OutOfMemoryError:
                raise AttnlmError(
                    f"out of memory at step {step + 1}; try a smaller train.batch_size or "
                    "model.block_size, or raise train.grad_accum (the last checkpoint is kept)"
                ) from None
            loss_value += loss.item() / t.grad_accum
        if not math.isfinite(loss_value):
            raise AttnlmError(f"loss became {loss_value} at step {step + 1}; stopped, the last "
                              "good checkpoint is kept (try a lower train.lr)")
        if t.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_time += time.perf_counter() - tick
        tokens_per_s = (step - start_step) * tokens_per_step / train_time
        bar.update(1)
        if step % t.log_interval == 0 or step == t.max_iters:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            metrics.write(step=step, loss=loss_value, lr=lr, tokens_per_s=tokens_per_s)
        if step % t.eval_interval == 0 or step == t.max_iters:
            val_loss = evaluate()
            best_val = min(best_val, val_loss)
            metrics.write(step=step, val_loss=val_loss)
            say(f"step {step}: train loss {loss_value:.4f}, val loss {val_loss:.4f}")
            save()
    bar.close()
    summary = {
        "steps": step, "train_loss": loss_value, "val_loss": val_loss, "best_val_loss": best_val,
        "tokens_per_s": (step - start_step) * tokens_per_step / train_time if train_time else None,
        "train_time_s": train_time, "params": model.num_params(), "out": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
