"""The run directory: the one module that knows its files, the lock that gives it one writer,
and loading a model from a run (or a checkpoint file) with its backend policy.

    config.yaml      the resolved config the run trains with (rewritten when a resume changes it)
    tokenizer.json   the tokenizer state (and tokenizer.model for SentencePiece kinds)
    checkpoint.pt    the latest checkpoint; checkpoints/step-NNNNNNN.pt the last train.keep_last
    metrics.jsonl    one JSON object per logged step or evaluation
    summary.json     the final figures of a finished run
    eval.json        `attnlm eval RUN --json > RUN/eval.json`, read by gather
    .lock            held by the one process writing the run
"""

import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import sys
from pathlib import Path

import yaml

from attnlm import checkpoint, config as config_mod, tokenizer as tokenizer_mod
from attnlm.errors import AttnlmError, InputError
from attnlm.files import atomic_write, remove_stale_temps, write_errors

CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
CHECKPOINT = "checkpoint.pt"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVAL = "eval.json"
LOCK = ".lock"


def note(message):
    """A line on stderr, from rank 0 alone in a torchrun job (every rank would say the same)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


@contextlib.contextmanager
def lock(out):
    """One process per run directory: a second one is refused rather than interleaving files.
    The directory is created here; if this process created it and leaves nothing in it (a
    refused or failed start), it is removed again. Temporary files left by a writer killed
    outright are removed: while the lock is held, no other writer can own one."""
    out = Path(out)
    created = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the run directory {out}: {err.strerror}") from None
    try:
        with open(out / LOCK, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"{out} is in use by another attnlm process") from None
            remove_stale_temps(out, every=True)
            yield
    finally:
        if created and [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink()
            for folder in created:
                with contextlib.suppress(OSError):  # one another process has filled meanwhile
                    folder.rmdir()


def refuse_existing(out):
    if (Path(out) / CHECKPOINT).exists():
        raise InputError(f"{out} already holds a run; pass --resume to continue it or choose "
                         "another --out")


def checkpoint_path(run):
    """The checkpoint of a run directory, or a checkpoint file itself."""
    path = Path(run)
    if path.is_dir():
        path = path / CHECKPOINT
        if not path.exists():
            raise InputError(f"{run} holds no {CHECKPOINT} (is it a run directory?)")
    elif not path.exists():
        raise InputError(f"{run}: no such run directory or checkpoint")
    return path


def load_checkpoint(run):
    return checkpoint.load(checkpoint_path(run))


def save_checkpoint(out, payload, keep_last=0):
    """Save the run's checkpoint.pt; with keep_last > 0 also keep the last N as
    checkpoints/step-NNNNNNN.pt (hard links to the same bytes: no extra disk)."""
    out = Path(out)
    checkpoint.save(payload, out / CHECKPOINT)
    if keep_last:
        folder = out / CHECKPOINTS
        folder.mkdir(exist_ok=True)
        kept = folder / f"step-{payload['step']:07d}.pt"
        kept.unlink(missing_ok=True)
        try:
            os.link(out / CHECKPOINT, kept)
        except OSError as err:  # a file system without hard links, or a full one
            raise AttnlmError(f"cannot keep {kept} for train.keep_last={keep_last}: "
                              f"{err.strerror}; checkpoint.pt itself was saved") from None
        for old in sorted(folder.glob("step-*.pt"))[:-keep_last]:
            old.unlink()


def read_config(run):
    path = Path(run) / CONFIG
    doc = config_mod.read_yaml(path)
    if not doc:  # attnlm writes every section: an empty file is a damaged one, not the defaults
        raise InputError(f"{path} is empty")
    return config_mod.from_dict(doc)


def write_config(out, cfg):
    with write_errors(Path(out) / CONFIG):
        atomic_write(Path(out) / CONFIG, yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False))


def write_tokenizer(out, tokenizer):
    tokenizer_mod.save(tokenizer, Path(out) / TOKENIZER)


def check_files_agree(out, ckpt):
    """On resume, config.yaml and tokenizer.json must describe the checkpoint's run. A model,
    tokenizer or data value that differs means a checkpoint copied from another run (or an edit
    that cannot apply): refused. Other edits to config.yaml are ignored, and said so: the
    checkpoint's config (with --set on top) is the one the run goes on with."""
    out = Path(out)
    saved = ckpt["config"]
    try:
        on_disk = config_mod.to_dict(read_config(out))
    except InputError as err:
        note(f"note: {out / CONFIG} cannot be read ({err}); it is rewritten from the checkpoint")
        on_disk = saved
    differ = [(section, key, value, on_disk.get(section, {}).get(key))
              for section, values in saved.items() for key, value in values.items()
              if on_disk.get(section, {}).get(key) != value]
    for section, key, value, edited in differ:
        if section in ("model", "tokenizer", "data"):
            raise InputError(
                f"{out / CHECKPOINT} does not belong with {CONFIG}: {section}.{key}={value!r} in "
                f"the checkpoint, {edited!r} in {CONFIG} (a checkpoint copied from another run, "
                "or an edited config.yaml); refused")
    if differ:
        keys = ", ".join(f"{section}.{key}" for section, key, _, _ in differ)
        note(f"note: edits to {out / CONFIG} ({keys}) are ignored; change training values with "
             "--resume --set KEY=VALUE")
    path = out / TOKENIZER
    if path.exists():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = None
        if state != ckpt["tokenizer"]:
            raise InputError(f"{out / CHECKPOINT} does not belong with {TOKENIZER}: their "
                             "tokenizers differ (a checkpoint copied from another run?); refused")


def _parse_records(path):
    """The JSON objects of a JSON-lines file, and whether its last line was torn (half-written
    by a process that died or ran out of disk): that line is left out. A bad line elsewhere is
    corruption and an error."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "step" not in record:
            if number == len(lines):
                return records, True
            raise AttnlmError(f"{path} line {number} is not a metrics record; the file is damaged")
        records.append(record)
    return records, False


def read_metrics(run):
    """The records of a run's metrics.jsonl (a torn last line of a running run left out)."""
    path = Path(run) / METRICS
    if not path.is_file():
        raise InputError(f"{run} holds no {METRICS} (is it a run directory?)")
    return _parse_records(path)[0]


def _dumps(value, **kwargs):
    return json.dumps(value, allow_nan=False, **kwargs)  # NaN is not JSON: figures use null


class MetricsLog:
    """metrics.jsonl, appended one record at a time."""

    def __init__(self, out):
        self.path = Path(out) / METRICS

    def start(self):
        with write_errors(self.path):
            atomic_write(self.path, "")

    def resume(self, step):
        """Keep the records up to the checkpoint's step (a torn last line is repaired), written
        whole or not at all."""
        records, torn = _parse_records(self.path) if self.path.exists() else ([], False)
        if torn:
            note(f"note: {self.path} ended in a half-written line; it was dropped")
        with write_errors(self.path):
            atomic_write(self.path, "".join(_dumps(r) + "\n" for r in records if r["step"] <= step))

    def write(self, **record):
        with write_errors(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(_dumps(record) + "\n")


def _read_json(path):
    """A JSON object from path, None if there is no such file; InputError if it is damaged."""
    try:
        found = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise InputError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(found, dict):
        raise InputError(f"{path} is not a JSON object")
    return found


def read_summary(run):
    """The run's summary.json, or None while it is unfinished."""
    return _read_json(Path(run) / SUMMARY)


def write_summary(out, summary):
    with write_errors(Path(out) / SUMMARY):
        atomic_write(Path(out) / SUMMARY, _dumps(summary, indent=2) + "\n")


def read_eval(run):
    """The run's eval.json (saved from `attnlm eval --json`), or None."""
    return _read_json(Path(run) / EVAL)


def _runs_under(path):
    """path itself if it is a run, else every run below it at any depth, sorted (links to
    folders are not followed, so a link loop cannot list a run twice)."""
    if (path / CONFIG).is_file():
        return [path]
    runs = []
    for folder, subfolders, files in os.walk(path):
        if CONFIG in files:
            runs.append(Path(folder))
            subfolders.clear()  # a run holds no other runs
    return sorted(runs)


def find_runs(patterns, warn):
    """Run directories (those holding a config.yaml), in order, each once: a pattern is a run
    directory, a folder of them (folders of folders too), or a glob matching either. A pattern
    that finds none is reported to warn(message) and skipped; none at all is an InputError."""
    runs, seen = [], set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        found = [run for match in matches for run in _runs_under(Path(match))]
        if not found:
            warn(f"{pattern}: no run directory there (none holds a {CONFIG}); skipped")
        for run in found:
            if run.resolve() not in seen:  # one run, however it is spelled
                seen.add(run.resolve())
                runs.append(run)
    if not runs:
        raise InputError(f"no run directory found (none holds a {CONFIG})")
    return runs


def load_model(run, device="cpu"):
    """(model in eval mode, tokenizer, config, checkpoint) from a run directory or checkpoint.

    Backend policy: a model trained with a CUDA-only backend (triton) runs with tiled, the same
    algorithm in plain torch, on a device without CUDA, and says so on stderr."""
    import torch

    from attnlm.attention import BACKENDS, check_backend
    from attnlm.model import GPT

    ckpt = load_checkpoint(run)
    cfg = config_mod.from_dict(ckpt["config"])
    tokenizer = tokenizer_mod.from_state(ckpt["tokenizer"])
    rows = ckpt["model"]["tok_emb.weight"].size(0)
    if rows != tokenizer.vocab_size:
        raise InputError(f"{run}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"was trained on {rows}; they do not belong together")
    device = torch.device(device)
    if BACKENDS[cfg.model.attention].cuda_only and device.type != "cuda":
        note(f"note: model.attention={cfg.model.attention!r} needs CUDA; running it with 'tiled', "
             "the same algorithm in plain torch")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="tiled"))
    check_backend(cfg.model.attention, device)
    model = GPT(cfg.model, tokenizer.vocab_size)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise AttnlmError(f"{run}: weights do not fit the saved config ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), tokenizer, cfg, ckpt
