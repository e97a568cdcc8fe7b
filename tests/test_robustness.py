"""Nothing lost: interruption, kill -9, numerical faults, bad checkpoints, bad input."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from attnlm import checkpoint, run as run_mod
from attnlm.cli import cli
from attnlm.config import KEYS
from attnlm.files import temp_path
from attnlm.interrupt import Interrupted
from attnlm.train import train
from tests.helpers import TINY, text_file, tiny_config, train_curve, wait_for_step

LONG = [*TINY, "train.max_iters=300", "train.lr_decay_iters=300", "train.eval_interval=100"]


def attnlm(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "attnlm", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def sets(*overrides):
    return [x for o in overrides for x in ("--set", o)]


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_saves_exits_130_and_resume_matches_uninterrupted(tmp_path, sig):
    source = text_file(tmp_path)
    train(tiny_config(source, *LONG), tmp_path / "full", quiet=True)
    args = sets(f"data.source={source}", *LONG)
    proc = attnlm("train", *args, "--out", tmp_path / "cut", "--quiet")
    wait_for_step(tmp_path / "cut", 5, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    stopped_at = checkpoint.load(tmp_path / "cut" / "checkpoint.pt")["step"]
    assert 5 <= stopped_at < 300
    resumed = attnlm("train", "--out", tmp_path / "cut", "--resume", "--quiet")
    assert resumed.wait() == 0, resumed.communicate()
    assert train_curve(tmp_path / "cut") == train_curve(tmp_path / "full")


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.2])
def test_a_signal_at_start_up_stops_the_run_with_nothing_written(tmp_path, delay):
    """Wherever the signal lands (imports, config, data), the run stops: exit 130, no run."""
    source = text_file(tmp_path)
    proc = attnlm("train", *sets(f"data.source={source}", *LONG), "--out", tmp_path / "r", "--quiet")
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_signal_during_data_preparation_stops_at_once(tmp_path, monkeypatch):
    """Tokenizer training and encoding run in C for long stretches: the signal must not wait."""
    busy = threading.Event()  # a long stretch of work that the signal must not wait for
    monkeypatch.setattr("attnlm.train.prepare_training", lambda *a, **k: busy.wait(30))
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
    tick = time.monotonic()
    try:
        with pytest.raises(Interrupted, match="nothing was written"):
            train(tiny_config(text_file(tmp_path)), tmp_path / "r", quiet=True)
        assert time.monotonic() - tick < 5
        assert not (tmp_path / "r").exists()
    finally:
        busy.set()  # the abandoned worker ends


def test_kill_9_at_random_moments_leaves_a_loadable_checkpoint(tmp_path):
    source = text_file(tmp_path)
    rng = random.Random(0)
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        # A checkpoint every step: most kills land near or inside a write.
        proc = attnlm("train", *sets(f"data.source={source}", *LONG, "train.eval_interval=1",
                                     "train.eval_iters=1"), "--out", run, "--quiet")
        wait_for_step(run, 1, proc)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.communicate()
        leftovers = [p.name for p in run.iterdir() if p.name.startswith(".checkpoint.pt.tmp")]
        assert checkpoint.load(run / "checkpoint.pt")["step"] >= 1, leftovers
        run_mod.load_model(run)  # and the weights fit the model
    # A resume after the kill goes on from there, and clears what killed writers left; a temp
    # named after a live process (this one) is stale too, as the run's lock is held.
    (run / temp_path(run / "checkpoint.pt").name).write_bytes(b"half")
    proc = attnlm("train", "--out", run, "--resume", "--quiet", "--set", "train.max_iters=400")
    assert proc.wait() == 0, proc.communicate()
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_keep_last_n_checkpoints(tmp_path):
    cfg = tiny_config(text_file(tmp_path), "train.eval_interval=4", "train.keep_last=2")
    train(cfg, tmp_path / "run", quiet=True)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-0000016.pt", "step-0000020.pt"]
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / kept[0])["step"] == 16


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    train(tiny_config(text_file(tmp), "train.max_iters=2"), tmp / "run", quiet=True)
    return tmp / "run"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_truncated_checkpoint_is_one_line_exit_1(small_run, tmp_path):
    data = (small_run / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    result = invoke("eval", tmp_path)
    assert result.exit_code == 1 and "not a readable attnlm checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_mismatched_tokenizer_is_refused(small_run, tmp_path):
    ckpt = checkpoint.load(small_run / "checkpoint.pt")
    ckpt["tokenizer"] = {"kind": "bytes"}
    checkpoint.save(ckpt, tmp_path / "checkpoint.pt")
    result = invoke("generate", tmp_path, "--max-new-tokens", 2)
    assert result.exit_code == 2 and "do not belong together" in result.stderr


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    # The CPU's allocator raises a plain RuntimeError.
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_out_of_memory_is_explained_and_keeps_the_checkpoint(tmp_path, monkeypatch, error):
    source = text_file(tmp_path)
    train(tiny_config(source, "train.max_iters=10"), tmp_path / "run", quiet=True)
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr("attnlm.model.GPT.forward", no_memory)
    result = invoke("train", "--out", tmp_path / "run", "--resume", "--set", "train.max_iters=20")
    assert result.exit_code == 1
    assert "out of memory at step 11" in result.stderr and "batch_size" in result.stderr
    assert "internal error" not in result.stderr
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good


def test_a_model_too_large_for_memory_is_one_line(tmp_path, monkeypatch):
    def no_memory(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 2199023255552 bytes.")

    monkeypatch.setattr("attnlm.model.GPT.__init__", no_memory)
    result = invoke("train", "--out", tmp_path / "run", "--set", f"data.source={text_file(tmp_path)}",
                    *[x for o in TINY for x in ("--set", o)])
    assert result.exit_code == 1, result.output
    assert "out of memory making the model" in result.stderr and "model.n_embd" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    train(tiny_config(text_file(tmp_path), "train.max_iters=10"), tmp_path / "run", quiet=True)
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    def disk_full(obj, f):
        f.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4058")

    monkeypatch.setattr(torch, "save", disk_full)
    result = invoke("train", "--out", tmp_path / "run", "--resume", "--quiet",
                    "--set", "train.max_iters=20")
    assert result.exit_code == 1 and "no space left on the device" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "unexpected pos" not in result.stderr
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good
    assert not [p.name for p in (tmp_path / "run").iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("command", [("eval",), ("generate", "--max-new-tokens", 2)])
def test_bit_flips_in_the_embedding_are_exit_1(small_run, tmp_path, command):
    embedding = checkpoint.load(small_run / "checkpoint.pt")["model"]["tok_emb.weight"]
    data = bytearray((small_run / "checkpoint.pt").read_bytes())
    at = data.find(embedding.numpy().tobytes())
    assert at > 0
    for offset in (17, 402):  # two flipped bits inside the embedding's bytes
        data[at + offset] ^= 0x04
    (tmp_path / "checkpoint.pt").write_bytes(bytes(data))
    result = invoke(command[0], tmp_path, *command[1:])
    assert result.exit_code == 1 and "corrupt" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_nan_weights_in_a_checkpoint_are_exit_1(small_run, tmp_path):
    ckpt = checkpoint.load(small_run / "checkpoint.pt")
    ckpt["model"]["tok_emb.weight"][0, 0] = float("nan")
    ckpt.pop("format")
    torch.save({"format": 1, **ckpt}, tmp_path / "checkpoint.pt")  # no checksum to catch it
    result = invoke("generate", tmp_path, "--max-new-tokens", 2)
    assert result.exit_code == 1 and "non-finite weights" in result.stderr, result.output


@pytest.mark.parametrize("text, overrides, message", [
    ("", [], "holds no text"),
    ("tiny", [], "needs at least 33"),
    ("x" * 200, ["data.val_fraction=0.01"], "the val split has 2 tokens"),
])
def test_data_problems_exit_2(tmp_path, text, overrides, message):
    path = tmp_path / "t.txt"
    path.write_text(text)
    result = invoke("train", *sets(f"data.source={path}", *TINY, *overrides), "--out", tmp_path / "r")
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "r").exists()  # not even an empty folder holding .lock


values = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                   st.floats(allow_nan=True).map(str), st.sampled_from(["true", "no", "", "1e3"]))
keys = st.one_of(st.sampled_from(sorted(KEYS)), st.text(max_size=15))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(keys, values), max_size=4))
def test_any_set_values_give_0_or_2_never_a_traceback(pairs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fuzzed relative data.cache_dir or source lands here
    result = invoke("train", "--dry-run", *[x for k, v in pairs for x in ("--set", f"{k}={v}")])
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


yaml_docs = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(keys, st.sampled_from(["model", "train"])),
                                            inner, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=yaml_docs)
def test_any_yaml_document_gives_0_or_2_never_a_traceback(doc, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.getbasetemp())  # a relative data.cache_dir lands here
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = invoke("train", "--dry-run", "--config", path)
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


def test_invalid_yaml_syntax_is_exit_2(tmp_path):
    (tmp_path / "c.yaml").write_text("model: [unclosed\n")
    result = invoke("train", "--dry-run", "--config", tmp_path / "c.yaml")
    assert result.exit_code == 2 and "not valid YAML" in result.stderr
