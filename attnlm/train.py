"""The training loop: teacher forcing, AdamW, warmup + cosine schedule, periodic eval and
checkpoints, exact resume, graceful interruption."""

import contextlib
import dataclasses
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from attnlm import config as config_mod, distributed, run, tokenizer as tokenizer_mod, utilisation
from attnlm.attention import check_backend
from attnlm.data import BatchSampler, need_tokens, prepare_training
from attnlm.errors import AttnlmError, InputError
from attnlm.evaluate import split_loss
from attnlm.interrupt import Interrupted, deferred_interrupts
from attnlm.model import GPT
from attnlm.optim import make_optimizer
from attnlm.runtime import (autocast, compiled, keep_freed_memory, resolve_device, set_threads,
                            slow_dtype_warning)

OUT_OF_MEMORY = ("can't allocate memory", "DefaultCPUAllocator")  # the CPU's RuntimeError


def lr_at(step, t):
    """Linear warmup to t.lr, cosine decay to t.min_lr at lr_decay_iters, then flat."""
    decay_end = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if step >= decay_end:
        return t.min_lr
    progress = (step - t.warmup_iters) / max(decay_end - t.warmup_iters, 1)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def fix_schedule(cfg):
    """The decay horizon is fixed when a run starts: lr_decay_iters=0 becomes max_iters, and is
    saved so, so that raising max_iters on resume does not stretch the cosine again."""
    if cfg.train.lr_decay_iters:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, lr_decay_iters=cfg.train.max_iters))


def describe_schedule(t, step):
    end = t.lr_decay_iters or t.max_iters
    if step < end:
        return f"lr schedule: cosine to {t.min_lr:g} at step {end}, then flat at {t.min_lr:g}"
    return (f"lr schedule: flat at {t.min_lr:g} (the cosine ended at step {end}; "
            "train.lr_decay_iters sets another horizon)")


def configure(yaml_doc, overrides, out, resume=False):
    """The config of a new run, or that of the run in `out` with new overrides on top."""
    with distributed.alike_on_every_rank():
        if resume:
            return resume_config(out, yaml_doc, overrides)
        return fix_schedule(config_mod.build_config(yaml_doc, overrides))


def resume_config(out, yaml_doc, overrides):
    """The saved config of a run with new overrides on top (e.g. more train.max_iters); the
    model, tokenizer and data must stay as they were."""
    ckpt = run.load_checkpoint(out)
    run.check_files_agree(out, ckpt)
    saved = fix_schedule(config_mod.from_dict(ckpt["config"]))
    cfg = fix_schedule(config_mod.build_config(yaml_doc, overrides, base=saved))
    for section in ("model", "tokenizer", "data"):
        if getattr(cfg, section) != getattr(saved, section):
            raise InputError(f"cannot change the {section} section when resuming {out}")
    if cfg.train.optimizer != saved.train.optimizer:
        raise InputError(f"cannot change train.optimizer when resuming {out}: the run's optimizer "
                         f"state is {saved.train.optimizer}'s")
    if cfg.train.grad_accum == saved.train.grad_accum:
        cfg = keep_step_size(cfg, saved.train, ckpt.get("world_size", 1), distributed.world())
    return cfg


def keep_step_size(cfg, saved, saved_size, w):
    """A run resumed by another number of processes, or with another batch_size (and its saved
    grad_accum), keeps its sequences per step (batch_size x grad_accum x processes) by changing
    grad_accum, so that its steps go on meaning the same."""
    t = cfg.train
    per_step = saved.batch_size * saved.grad_accum * saved_size
    per_micro_batch = t.batch_size * w.size  # sequences of one micro-batch across the job
    if t.grad_accum * per_micro_batch == per_step:
        return cfg
    if per_step % per_micro_batch:
        raise InputError(f"this run takes {per_step} sequences a step, saved by {saved_size} "
                         f"process(es) at train.batch_size={saved.batch_size}; {w.size} "
                         f"process(es) at train.batch_size={t.batch_size} cannot share them "
                         f"evenly (choose sizes whose product divides {per_step}, or set "
                         f"train.grad_accum)")
    accum = per_step // per_micro_batch
    if w.main:
        batch = (f", train.batch_size {saved.batch_size} -> {t.batch_size}"
                 if t.batch_size != saved.batch_size else "")
        run.note(f"resuming on {w.size} process{'es' * (w.size > 1)} a run saved by {saved_size}"
                 f"{batch}: train.grad_accum {t.grad_accum} -> {accum} keeps {per_step} "
                 "sequences a step")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum=accum))


@dataclass
class Ready:
    """What preflight found and built: everything a run needs before its first step."""
    device: torch.device
    amp: object
    tokenizer: object
    splits: dict
    data_sha256: str


def preflight(cfg, ckpt=None, progress=False, tokenizer=None):
    """Every check `train` makes before its first step, shared with --dry-run: device, backend
    and dtype on that device, the data source (readable, UTF-8, enough text for block_size),
    the tokenizer, and on resume that the text is the one the run started on."""
    t, m = cfg.train, cfg.model
    w = distributed.world()
    set_threads(t.threads or (distributed.threads_per_process(w) if w.size > 1 else 0))
    device = distributed.join(w, resolve_device(t.device))
    check_backend(m.attention, device)
    amp = autocast(device, t.dtype)
    if ckpt and tokenizer is None:
        tokenizer = tokenizer_mod.from_state(ckpt["tokenizer"])
    with deferred_interrupts() as interrupt:  # tokenizer training and encoding can take minutes
        tokenizer, splits = interrupt.run(prepare_training, cfg, tokenizer, progress=progress)
    need_tokens(splits["train"], "train", m.block_size)
    need_tokens(splits["val"], "val", m.block_size)
    digest = hashlib.sha256("".join(f"{name}:{split.sha256};" for name, split in
                                    sorted(splits.items())).encode()).hexdigest()
    if ckpt and ckpt.get("data_sha256", digest) != digest:
        raise InputError(f"the text of data.source={cfg.data.source!r} changed since this run "
                         "started; resuming would train on other text. Start a new run")
    return Ready(device, amp, tokenizer, splits, digest)


def prepare_job(cfg, ckpt, w, progress):
    """preflight on rank 0 first (it trains the tokenizer and fills the token cache), then on
    the other ranks with rank 0's tokenizer, from the cache; a refusal stops every rank."""
    found = {}

    def first():
        found["ready"] = preflight(cfg, ckpt, progress)
        return found["ready"].tokenizer.state()

    state = distributed.from_main(w, first)
    return found.get("ready") or preflight(cfg, ckpt, tokenizer=tokenizer_mod.from_state(state))


def dry_run(cfg, out, resume=False, quiet=False):
    """The checks of `train` up to its first step; writes nothing into the run directory."""
    if not resume:
        run.refuse_existing(out)
    preflight(cfg, run.load_checkpoint(out) if resume else None, progress=not quiet)


def _out_of_memory(err):
    return isinstance(err, torch.OutOfMemoryError) or any(s in str(err) for s in OUT_OF_MEMORY)


def build_model(m, vocab_size, device):
    try:
        return GPT(m, vocab_size).to(device)
    except RuntimeError as err:
        if not _out_of_memory(err):
            raise
        raise AttnlmError(f"out of memory making the model on {device.type}; make it smaller "
                          "(model.n_layer, model.n_embd, model.mlp_hidden, model.block_size)") from None


def diverged(val_loss, vocab_size):
    """A val loss no model worth keeping has: not finite, or over twice that of guessing
    uniformly (ln V), which even an untrained model scores about."""
    return not math.isfinite(val_loss) or val_loss > 2 * math.log(max(vocab_size, 2))


def train(cfg, out, resume=False, quiet=False):
    """Train per cfg into run directory `out`; returns the summary (also in summary.json), or
    None for a resumed run that has already run train.max_iters steps (left as it was).

    Under torchrun every rank calls this: rank 0 holds the run directory's lock and writes it."""
    out = Path(out)
    w = distributed.world()
    with distributed.naming_a_lost_peer(w), deferred_interrupts() as interrupt, \
            contextlib.ExitStack() as held:
        held.callback(distributed.leave)
        distributed.join(w, resolve_device(cfg.train.device))

        def claim():
            held.enter_context(run.lock(out))
            if not resume:
                run.refuse_existing(out)

        distributed.from_main(w, claim)
        summary = _train(cfg, out, resume, quiet, interrupt, w)
        distributed.wait_for_all(w)
        return summary


def _train(cfg, out, resume, quiet, interrupt, w):
    began = time.perf_counter()
    cfg = cfg if resume else fix_schedule(cfg)
    t, m = cfg.train, cfg.model
    ckpt = run.load_checkpoint(out) if resume else None
    if ckpt and ckpt["step"] >= t.max_iters:
        return None
    ready = prepare_job(cfg, ckpt, w, progress=not quiet and w.main)
    device, tokenizer, splits = ready.device, ready.tokenizer, ready.splits
    show_bar = not quiet and w.main and sys.stderr.isatty()
    say = (lambda msg: None) if quiet or not w.main else tqdm.write if show_bar else run.note
    if warning := slow_dtype_warning(device, t.dtype):
        say(warning)
    keep_freed_memory()  # a step's activations are the next step's: no page faults for them
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(m, tokenizer.vocab_size, device)
    trained = distributed.wrap(model, w, t.parallel, device)  # what the job's state lives in
    # Compiled around the wrapper (DDP then splits the graph at its gradient buckets); the
    # state dicts are still taken from `trained`, so their keys never carry `_orig_mod.`.
    forward = compiled(trained) if t.compile else trained
    optimizer = make_optimizer(trained, t)
    scaler = torch.amp.GradScaler(device.type, enabled=t.dtype == "float16")
    sampler = BatchSampler(splits["train"], m.block_size, t.batch_size, t.seed, device)
    step, best_val = 0, math.inf
    if ckpt:
        distributed.load_full_state(trained, optimizer, ckpt["model"], ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
        if ckpt.get("scaler"):  # empty where the run trained without float16
            scaler.load_state_dict(ckpt["scaler"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
    resumed, ckpt = ckpt is not None, None  # restored: its tensors need not stay in memory
    interrupt.check()  # the last moment at which nothing has been written
    metrics = run.MetricsLog(out)
    saved = {"step": step if resumed else None, "config": False}
    flops = utilisation.flops_per_token(model)
    peak = utilisation.matmul_peak(device, t.dtype) if w.main else None

    def save():
        # Every rank takes part (FSDP gathers the shards); rank 0 writes.
        model_state, optimizer_state = distributed.full_state(trained, optimizer)
        if w.main:
            if not saved["config"]:  # config.yaml changes with the first checkpoint of this process
                run.write_config(out, cfg)
                saved["config"] = True
            run.save_checkpoint(out, {
                "config": config_mod.to_dict(cfg), "tokenizer": tokenizer.state(),
                "model": model_state, "optimizer": optimizer_state, "scaler": scaler.state_dict(),
                "sampler": sampler.state_dict(), "world_size": w.size,
                "step": step, "best_val_loss": best_val, "data_sha256": ready.data_sha256,
            }, t.keep_last)
        saved["step"] = step

    if resumed:
        if w.main:
            metrics.resume(step)
            began -= run_seconds(out)  # the curve against time goes on where it stopped
        say(describe_schedule(t, step))
    else:  # the run directory is whole from here: a run that fails later can be resumed
        if w.main:
            run.write_tokenizer(out, tokenizer)
            metrics.start()
        save()

    micro_batches = t.grad_accum * w.size  # of batch_size sequences, drawn as one for the step
    tokens_per_step = t.batch_size * micro_batches * m.block_size
    bar = tqdm(total=t.max_iters, initial=step, disable=not show_bar, unit="step", dynamic_ncols=True)
    clock = StepClock(tokens_per_step)
    val_loss, stop, compile_s, evaluated = None, False, 0.0, False
    forward.train()
    try:
        while step < t.max_iters:
            if stop:
                if saved["step"] != step:
                    save()
                raise distributed.shared(Interrupted(
                    f"interrupted at step {step}; checkpoint saved, continue with --resume"))
            tick = time.perf_counter()
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # This rank's share of the step: micro-batch i of every rank is drawn before i + 1.
            starts = sampler.draw(micro_batches * t.batch_size).view(t.grad_accum, w.size, -1)
            loss_value = 0.0
            for i, mine in enumerate(starts[:, w.rank]):
                x, y = sampler.windows_at(mine)
                seed_micro_batch(t.seed, step, i * w.size + w.rank, device)
                with distributed.gradient_sync(trained, i == t.grad_accum - 1):
                    with ready.amp:  # the forward pass alone: backward runs in the forward's dtypes
                        # The loss trained on, the head-diversity penalty included (val is without).
                        _, loss = forward(x, y, head_diversity=t.head_diversity)
                    scaler.scale(loss / t.grad_accum).backward()
                loss_value += loss.item() / t.grad_accum
            # One collective: the job's mean loss, and whether any rank was asked to stop.
            loss_sum, stops = distributed.agree([loss_value, interrupt.signal is not None], w, device)
            loss_value, stop = loss_sum / w.size, stops > 0
            if not math.isfinite(loss_value):
                raise distributed.shared(AttnlmError(
                    f"loss became {loss_value} at step {step + 1}; stopped, the last good "
                    "checkpoint is kept (try a lower train.lr)"))
            if t.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trained.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            clock.add(time.perf_counter() - tick)
            if t.compile and clock.steps == 1:
                compile_s += clock.first
                say(f"compiled: the first step took {clock.first:.1f}s (not counted in tokens/s)")
            tokens_per_s = clock.tokens_per_s()
            bar.update(1)
            if step % t.log_interval == 0 or step == t.max_iters:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
                if w.main:
                    metrics.write(step=step, loss=loss_value, lr=lr, tokens_per_s=tokens_per_s,
                                  step_s=clock.last, time_s=time.perf_counter() - began)
            if step % t.eval_interval == 0 or step == t.max_iters:
                tock = time.perf_counter()
                val_loss = split_loss(forward, splits["val"], m.block_size, t.batch_size, device,
                                      t.dtype, max_batches=t.eval_iters, seed=t.seed)
                if t.compile and not evaluated:  # the first evaluation compiles its own graph
                    compile_s += time.perf_counter() - tock
                evaluated = True
                if diverged(val_loss, tokenizer.vocab_size):
                    raise distributed.shared(AttnlmError(
                        f"val loss {val_loss:.4g} at step {step}: the model diverged; stopped, the "
                        f"checkpoint of step {saved['step']} is kept (resume with a lower "
                        "train.lr: --resume --set train.lr=...)"))
                best_val = min(best_val, val_loss)
                if w.main:
                    metrics.write(step=step, val_loss=val_loss, time_s=time.perf_counter() - began)
                say(f"step {step}: train loss {loss_value:.4f}, val loss {val_loss:.4f}; "
                    f"{tokens_per_s:,.0f} tokens/s, "
                    f"{utilisation.describe(tokens_per_s, flops, peak, t.dtype, w.size)}")
                save()
    except RuntimeError as err:  # torch.OutOfMemoryError is one (a lost peer: see train)
        if t.compile and isinstance(err, torch._dynamo.exc.BackendCompilerFailed):
            cause = str(getattr(err, "inner_exception", err)).splitlines()[0]
            raise AttnlmError(f"torch.compile failed ({cause}); train without it: --set "
                              "train.compile=false (the last checkpoint is kept)") from None
        if not _out_of_memory(err):
            raise
        raise AttnlmError(
            f"out of memory at step {step + 1}; try a smaller train.batch_size or "
            "model.block_size, or raise train.grad_accum (the last checkpoint is kept)"
        ) from None
    finally:
        bar.close()
    tokens_per_s = clock.tokens_per_s() if clock.steps else None
    summary = {
        "steps": step, "train_loss": loss_value, "val_loss": val_loss, "best_val_loss": best_val,
        "tokens_per_s": tokens_per_s, "train_time_s": clock.seconds, "params": model.num_params(),
        "out": str(out), "wall_s": time.perf_counter() - began,
        "compile_s": compile_s if t.compile else None,
        "model_flops_per_token": flops, "matmul_peak_flops": peak, "peak_dtype": t.dtype,
        "utilisation": utilisation.fraction(tokens_per_s, flops, peak, w.size),
        "val_tokens_per_byte": splits["val"].tokens_per_byte,
        "world_size": w.size, "sequences_per_step": micro_batches * t.batch_size,
    }
    if w.main:
        run.write_summary(out, summary)
    return summary


class StepClock:
    """The seconds the training steps of this process took (the last one's too, for the metrics
    log). The first is kept apart: it holds one-off work (compilation with train.compile, the
    allocator's first requests), so the throughput counts the others."""

    def __init__(self, tokens_per_step):
        self.tokens_per_step, self.steps, self.first, self.seconds = tokens_per_step, 0, 0.0, 0.0
        self.last = 0.0

    def add(self, seconds):
        if not self.steps:
            self.first = seconds
        self.steps += 1
        self.seconds += seconds
        self.last = seconds

    def tokens_per_s(self):
        if self.steps == 1:  # nothing else to go by
            return self.tokens_per_step / self.first
        return (self.steps - 1) * self.tokens_per_step / (self.seconds - self.first)


def run_seconds(out):
    """The wall time a resumed run had reached: its last metrics record's time_s (0 for a run
    trained before attnlm recorded it)."""
    return next((r["time_s"] for r in reversed(run.read_metrics(out)) if "time_s" in r), 0.0)


def seed_micro_batch(seed, step, index, device):
    """Seed the device's generator (dropout's) for micro-batch `index` of a step, numbered across
    the whole job: its masks are then the same whichever process draws it and whether or not
    the run was resumed, so a job of several processes trains as one process would."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    # The one generator the step draws from: torch.manual_seed, which seeds every kind of
    # device, takes 80 us, 1% of a small model's step on the CPU.
    if device.type == "cuda":
        torch.cuda.manual_seed(value)
    else:
        torch.default_generator.manual_seed(value)
