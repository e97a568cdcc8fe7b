"""Several processes through torchrun (gloo on the CPU), against one process as the reference."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from attnlm import checkpoint, distributed
from attnlm.errors import InputError
from tests.helpers import TINY, text_file, train_curve, wait_for_step

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STEPS = ["train.max_iters=12", "train.lr_decay_iters=12", "train.eval_interval=6",
         "train.log_interval=1"]


def sets(*overrides):
    return [x for o in overrides for x in ("--set", o)]


# On the CPU (gloo) even where there is a GPU: these compare processes, not devices.
ON_CPU = ["--set", "train.device=cpu"]


def launch(nproc, *args, extra=(), **kwargs):
    """attnlm train under torchrun, one thread a process (the test machine may have 2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*TORCHRUN, *extra, f"--nproc_per_node={nproc}", "-m", "attnlm",
                             "train", "--quiet", *ON_CPU, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            **kwargs)


def single(*args):
    return subprocess.Popen([sys.executable, "-m", "attnlm", "train", "--quiet", *ON_CPU,
                             *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def assert_same_curve(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), step


@pytest.fixture
def source(tmp_path):
    return text_file(tmp_path)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_as_one_with_twice_the_accumulation(tmp_path, source, parallel):
    # With dropout: each micro-batch has its own masks, whichever process draws it. With the
    # head-diversity penalty: every block's share of it reaches the loss under FSDP too.
    base = sets(f"data.source={source}", *TINY, *STEPS, "model.dropout=0.1",
                "train.head_diversity=0.1")
    two = launch(2, *base, *sets(f"train.parallel={parallel}"), "--out", tmp_path / "two")
    one = single(*base, *sets("train.grad_accum=2"), "--out", tmp_path / "one")
    finish(two), finish(one)
    assert_same_curve(train_curve(tmp_path / "two"), train_curve(tmp_path / "one"))
    # One job, one run directory: written once, by rank 0.
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith(".")) == \
        sorted(p.name for p in (tmp_path / "one").iterdir() if not p.name.startswith("."))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sequences_per_step"] == 2 * 4
    # The checkpoint holds the model as one process has it: no wrapper's prefixes, no shards.
    saved = checkpoint.load(tmp_path / "two" / "checkpoint.pt")["model"]
    alone = checkpoint.load(tmp_path / "one" / "checkpoint.pt")["model"]
    assert saved.keys() == alone.keys()
    assert all(saved[k].shape == alone[k].shape for k in saved)


def test_a_run_saved_by_two_processes_resumes_on_one(tmp_path, source):
    base = sets(f"data.source={source}", *TINY, *STEPS)
    full = launch(2, *base, "--out", tmp_path / "full")
    half = launch(2, *base, *sets("train.max_iters=6"), "--out", tmp_path / "cut")
    finish(full), finish(half)
    assert checkpoint.load(tmp_path / "cut" / "checkpoint.pt")["step"] == 6
    resumed = single("--out", tmp_path / "cut", "--resume", *sets("train.max_iters=12"))
    err = resumed.communicate(timeout=120)[1]
    assert resumed.returncode == 0, err
    assert "1 process" in err and "train.grad_accum 1 -> 2" in err  # says how it keeps the step
    assert_same_curve(train_curve(tmp_path / "cut"), train_curve(tmp_path / "full"))


def test_a_refusal_on_rank_0_stops_the_job_with_one_line(tmp_path, source):
    base = sets(f"data.source={source}", *TINY, *STEPS, "train.max_iters=2")
    finish(single(*base, "--out", tmp_path / "run"))
    proc = launch(2, *base, "--out", tmp_path / "run")  # no --resume: refused
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("already holds a run") == 1, err[-2000:]


LONG = ["train.max_iters=100000", "train.eval_interval=3", "train.eval_iters=1"]


def test_a_bad_config_and_a_dry_run_say_it_once_for_the_machine(tmp_path, source):
    base = sets(f"data.source={source}", *TINY)
    proc = launch(2, *base, *sets("train.max_iter=5"), "--out", tmp_path / "run")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("unknown key 'train.max_iter'") == 1, err[-2000:]
    proc = launch(2, *base, "--dry-run", "--json", "--out", tmp_path / "run")
    out = finish(proc)
    assert len(out.splitlines()) == 1 and json.loads(out)["train"]["batch_size"] == 4


def test_a_rank_killed_brings_the_job_down_with_a_loadable_checkpoint(tmp_path, source):
    run = tmp_path / "run"
    proc = launch(2, *sets(f"data.source={source}", *TINY, *LONG), "--out", run)
    wait_for_step(run, 4, proc)
    workers = subprocess.run(["pgrep", "-f", f"attnlm train.*{run}"], capture_output=True,
                             text=True).stdout.split()
    children = [p for p in workers if int(p) != proc.pid]
    assert len(children) == 2, workers
    os.kill(int(max(children, key=int)), signal.SIGKILL)  # the last started: rank 1
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "failed or was killed" in err or "exitcode" in err.lower(), err[-2000:]
    assert checkpoint.load(run / "checkpoint.pt")["step"] >= 3


def test_ctrl_c_to_the_launcher_stops_every_rank_after_one_step(tmp_path, source):
    run = tmp_path / "run"
    proc = launch(2, *sets(f"data.source={source}", *TINY, *LONG), "--out", run,
                  start_new_session=True)
    wait_for_step(run, 4, proc)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C reaches the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun's own code for a signal (1); each rank exits 130
    saved = checkpoint.load(run / "checkpoint.pt")["step"]
    assert saved == train_curve(run)[-1][0]  # saved at the step every rank stopped after
    assert err.count(f"error: interrupted at step {saved};") == 1, err[-2000:]  # rank 0 says it


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_into_one_run_directory(tmp_path, source):
    base = sets(f"data.source={source}", *TINY, *STEPS)
    nodes = [launch(1, *base, "--out", tmp_path / "run",
                    extra=["--nnodes=2", "--rdzv_backend=c10d",
                           "--rdzv_endpoint=127.0.0.1:29731", "--rdzv_id=attnlm-test"])
             for i in range(2)]
    for node in nodes:
        finish(node, timeout=240)
    one = single(*base, *sets("train.grad_accum=2"), "--out", tmp_path / "one")
    finish(one)
    assert_same_curve(train_curve(tmp_path / "run"), train_curve(tmp_path / "one"))


def test_more_processes_on_a_machine_than_its_gpus_is_refused_by_every_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for local_rank in (0, 1):  # the one that would get a GPU refuses too: nothing waits for a peer
        with pytest.raises(InputError, match=r"runs 2 processes of the job but shows 1 GPU\(s\); "
                                             r"start at most one a GPU \(torchrun --nproc_per_node=1\)"):
            distributed.join(distributed.World(local_rank, 2, local_rank, 2), torch.device("cuda"))


@pytest.mark.parametrize("visible, local_rank, gpus, want", [
    ("3", 1, 1, 0),         # a launcher left each process its own GPU
    (None, 1, 2, 1),        # torchrun: every process sees them all
    ("0,1", 1, 2, 1),
])
def test_each_process_takes_its_own_gpu(monkeypatch, visible, local_rank, gpus, want):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert distributed.own_gpu(distributed.World(local_rank, 2, local_rank, 2)) == want


def test_threads_follow_the_cores_a_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert distributed.threads_per_process(distributed.World(0, 2, 0, 2)) == 3
