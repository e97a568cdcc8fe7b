"""Nothing lost: interruption, kill -9, numerical faults, bad checkpoints, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from attnlm import checkpoint
from attnlm.cli import cli
from attnlm.config import KEYS
from attnlm.train import train
from tests.helpers import TINY, text_file, tiny_config

LONG = [*TINY, "train.max_iters=300", "train.lr_decay_iters=300", "train.eval_interval=100"]


def attnlm(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "attnlm", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def sets(*overrides):
    return [x for o in overrides for x in ("--set", o)]


def train_losses(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def wait_for_step(run, step, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len(train_losses(run)) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"training never reached step {step}: {proc.communicate()}")


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
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")


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
        checkpoint.load_model(run)  # and the weights fit the model
    # A resume after the kill goes on from there.
    proc = attnlm("train", "--out", run, "--resume", "--quiet", "--set", "train.max_iters=400")
    assert proc.wait() == 0, proc.communicate()


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


def test_out_of_memory_is_explained_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    source = text_file(tmp_path)
    train(tiny_config(source, "train.max_iters=10"), tmp_path / "run", quiet=True)
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("attnlm.model.GPT.forward", no_memory)
    result = invoke("train", "--out", tmp_path / "run", "--resume", "--set", "train.max_iters=20")
    assert result.exit_code == 1
    assert "out of memory at step 11" in result.stderr and "batch_size" in result.stderr
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good


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


values = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                   st.floats(allow_nan=True).map(str), st.sampled_from(["true", "no", "", "1e3"]))
keys = st.one_of(st.sampled_from(sorted(KEYS)), st.text(max_size=15))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(keys, values), max_size=4))
def test_any_set_values_give_0_or_2_never_a_traceback(pairs):
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
def test_any_yaml_document_gives_0_or_2_never_a_traceback(doc, tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = invoke("train", "--dry-run", "--config", path)
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


def test_invalid_yaml_syntax_is_exit_2(tmp_path):
    (tmp_path / "c.yaml").write_text("model: [unclosed\n")
    result = invoke("train", "--dry-run", "--config", tmp_path / "c.yaml")
    assert result.exit_code == 2 and "not valid YAML" in result.stderr
