import json
import math
import re

import pytest
import torch
import yaml
from click.testing import CliRunner

from attnlm import checkpoint, tokenizer as tokenizer_mod
from attnlm.cli import cli
from attnlm.config import build_config
from attnlm.errors import AttnlmError, InputError
from attnlm.model import GPT
from attnlm.runtime import slow_dtype_warning
from attnlm.run import load_model, lock as run_lock
from attnlm.distributed import World
from attnlm.train import fix_schedule, keep_step_size, lr_at, resume_config, train
from tests.helpers import TEXT, TINY, text_file, tiny_config


def losses(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def test_schedule_warmup_cosine_floor():
    t = build_config(overrides=["train.lr=1.0", "train.min_lr=0.1", "train.warmup_iters=10",
                                "train.max_iters=110"]).train
    assert lr_at(0, t) == pytest.approx(1 / 11)
    assert lr_at(9, t) == pytest.approx(10 / 11)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, t) == pytest.approx(0.1) and lr_at(500, t) == pytest.approx(0.1)


def test_run_directory_holds_everything(tmp_path):
    cfg = tiny_config(text_file(tmp_path))
    summary = train(cfg, tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    for name in ["config.yaml", "tokenizer.json", "checkpoint.pt", "metrics.jsonl", "summary.json"]:
        assert (run / name).exists(), name
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["steps"] == 20 and math.isfinite(summary["val_loss"])
    train_losses, val_losses = losses(run)
    assert [s for s, _ in train_losses] == list(range(1, 21)) and len(val_losses) == 2
    assert train_losses[-1][1] < train_losses[0][1]  # it learns


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    source = text_file(tmp_path)
    # Dropout: its masks must resume too. A fixed decay horizon: the same schedule for both.
    same = ["model.dropout=0.1", "train.lr_decay_iters=20"]
    train(tiny_config(source, *same), tmp_path / "full", quiet=True)
    half = tiny_config(source, *same, "train.max_iters=10")
    train(half, tmp_path / "resumed", quiet=True)
    cfg = resume_config(tmp_path / "resumed", None, ["train.max_iters=20"])
    train(cfg, tmp_path / "resumed", resume=True, quiet=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")


def test_resume_with_a_smaller_batch_keeps_the_sequences_of_a_step(tmp_path, capsys):
    """Half the batch on resume doubles grad_accum: each step still takes the same 4 sequences,
    so the curve goes on as the uninterrupted run's (to float rounding: the sums split)."""
    source = text_file(tmp_path)
    same = ["train.lr_decay_iters=20"]
    train(tiny_config(source, *same), tmp_path / "full", quiet=True)
    train(tiny_config(source, *same, "train.max_iters=10"), tmp_path / "resumed", quiet=True)
    cfg = resume_config(tmp_path / "resumed", None, ["train.max_iters=20", "train.batch_size=2"])
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (2, 2)
    assert "train.batch_size 4 -> 2: train.grad_accum 1 -> 2 keeps 4 sequences" in capsys.readouterr().err
    train(cfg, tmp_path / "resumed", resume=True, quiet=True)
    got, want = losses(tmp_path / "resumed"), losses(tmp_path / "full")
    assert [s for s, _ in got[0]] == [s for s, _ in want[0]]
    assert [v for _, v in got[0]] == pytest.approx([v for _, v in want[0]], rel=1e-4)


@pytest.mark.parametrize("saved, now, world, accum", [
    ((4, 1, 2), 8, 1, 1),   # half the processes at twice the batch: nothing to change
    ((4, 1, 2), 4, 1, 2),   # half the processes: twice the micro-batches
    ((4, 2, 1), 8, 1, 1),   # twice the batch on as many processes
    ((4, 1, 2), 4, 2, 1),   # as saved
])
def test_resume_keeps_the_saved_sequences_per_step(saved, now, world, accum):
    batch, saved_accum, saved_world = saved
    cfg = build_config(overrides=[f"train.batch_size={now}", f"train.grad_accum={saved_accum}"])
    saved_train = build_config(overrides=[f"train.batch_size={batch}",
                                          f"train.grad_accum={saved_accum}"]).train
    kept = keep_step_size(cfg, saved_train, saved_world, World(0, world))
    assert kept.train.grad_accum == accum
    assert kept.train.batch_size * kept.train.grad_accum * world == batch * saved_accum * saved_world


def test_resume_refuses_sizes_that_cannot_share_the_saved_step():
    cfg = build_config(overrides=["train.batch_size=4"])
    saved = build_config(overrides=["train.batch_size=4"]).train
    with pytest.raises(InputError, match="takes 8 sequences a step.*3 process"):
        keep_step_size(cfg, saved, 2, World(0, 3))


def test_resume_cannot_change_the_model(tmp_path):
    cfg = tiny_config(text_file(tmp_path), "train.max_iters=2")
    train(cfg, tmp_path / "run", quiet=True)
    with pytest.raises(InputError, match="cannot change the model section"):
        resume_config(tmp_path / "run", None, ["model.n_layer=3"])


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = tiny_config(text_file(tmp_path), "train.max_iters=2")
    train(cfg, tmp_path / "run", quiet=True)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(InputError, match="already holds a run"):
        train(cfg, tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_second_process_on_a_run_directory_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    with run_lock(tmp_path / "run"):
        with pytest.raises(InputError, match="in use by another attnlm process"):
            train(tiny_config(text_file(tmp_path)), tmp_path / "run", quiet=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    source = text_file(tmp_path)
    train(tiny_config(source, "train.max_iters=10"), tmp_path / "run", quiet=True)
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    cfg = resume_config(tmp_path / "run", None, ["train.max_iters=20", "train.lr=1e30",
                                                 "train.grad_clip=0", "train.warmup_iters=0",
                                                 "train.lr_decay_iters=20"])
    with pytest.raises(AttnlmError, match=r"loss became (nan|inf) at step 1\d"):
        train(cfg, tmp_path / "run", resume=True, quiet=True)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    cfg = tiny_config(text_file(tmp_path), "train.max_iters=3")
    train(cfg, tmp_path / "run", quiet=True)
    model, tokenizer, loaded_cfg, ckpt = load_model(tmp_path / "run")
    assert loaded_cfg == fix_schedule(cfg) and ckpt["step"] == 3
    assert tokenizer.decode(tokenizer.encode("the fox")) == "the fox"
    for name, tensor in ckpt["model"].items():
        assert torch.equal(model.state_dict()[name], tensor)


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    source = text_file(tmp_path)
    whole_val = "train.eval_iters=0"  # the same val windows whatever the batch size
    train(tiny_config(source, "train.batch_size=8", whole_val), tmp_path / "big", quiet=True)
    train(tiny_config(source, "train.batch_size=4", "train.grad_accum=2", whole_val),
          tmp_path / "accum", quiet=True)
    (big, big_val), (accum, accum_val) = losses(tmp_path / "big"), losses(tmp_path / "accum")
    assert [s for s, _ in big] == [s for s, _ in accum]
    assert [l for _, l in big] == pytest.approx([l for _, l in accum], rel=1e-4)
    assert big_val == pytest.approx(accum_val, rel=1e-4)


def test_bfloat16_warning_only_on_a_cpu_without_it(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert "train.dtype=float32" in slow_dtype_warning(cpu, "bfloat16")
    assert slow_dtype_warning(cpu, "float32") is None
    assert slow_dtype_warning(cuda, "bfloat16") is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert slow_dtype_warning(cpu, "bfloat16") is None


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_resuming_a_finished_run_leaves_its_results_and_says_so(tmp_path):
    cfg = tiny_config(text_file(tmp_path), "train.max_iters=4")
    train(cfg, tmp_path / "run", quiet=True)
    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    result = invoke("train", "--out", tmp_path / "run", "--resume")
    assert result.exit_code == 0, result.output
    assert "nothing trained, summary.json left as it was" in result.stdout
    assert len(result.output.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == files
    as_json = invoke("train", "--out", tmp_path / "run", "--resume", "--json")
    assert json.loads(as_json.stdout) == json.loads(files["summary.json"])


def test_resume_with_more_steps_rewrites_config_yaml(tmp_path):
    train(tiny_config(text_file(tmp_path), "train.max_iters=4"), tmp_path / "run", quiet=True)
    result = invoke("train", "--out", tmp_path / "run", "--resume", "--quiet",
                    "--set", "train.max_iters=6")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["max_iters"] == 6
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["config"] == saved


def lrs(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


def test_raising_max_iters_keeps_the_decay_horizon(tmp_path):
    source = text_file(tmp_path)
    train(tiny_config(source, "train.max_iters=10", "train.lr=1e-2", "train.min_lr=1e-3"),
          tmp_path / "run", quiet=True)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["lr_decay_iters"] == 10
    result = invoke("train", "--out", tmp_path / "run", "--resume", "--set", "train.max_iters=14")
    assert result.exit_code == 0, result.output
    assert "lr schedule: flat at 0.001 (the cosine ended at step 10" in result.stderr
    after = lrs(tmp_path / "run")
    # metrics log the lr of the step that ended at `step`, i.e. lr_at(step - 1).
    assert [after[s] for s in range(11, 15)] == [1e-3] * 4
    assert after[10] == pytest.approx(1e-3 + 0.5 * (1 + math.cos(math.pi * 4 / 5)) * 9e-3)


def test_an_explicit_decay_horizon_on_resume_is_used(tmp_path):
    source = text_file(tmp_path)
    train(tiny_config(source, "train.max_iters=10"), tmp_path / "run", quiet=True)
    cfg = resume_config(tmp_path / "run", None, ["train.max_iters=20", "train.lr_decay_iters=0"])
    assert cfg.train.lr_decay_iters == 20
    cfg = resume_config(tmp_path / "run", None, ["train.max_iters=20", "train.lr_decay_iters=15"])
    assert cfg.train.lr_decay_iters == 15


def test_a_diverged_eval_never_replaces_the_good_checkpoint_and_resume_recovers(tmp_path):
    source = text_file(tmp_path)
    result = invoke("train", "--out", tmp_path / "run", *sets(f"data.source={source}", *TINY,
                                                                 "train.lr=1e6", "train.eval_interval=1"))
    assert result.exit_code == 1 and "the model diverged" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["step"] == 0
    result = invoke("train", "--out", tmp_path / "run", "--resume", "--quiet",
                    "--set", "train.lr=1e-3")
    assert result.exit_code == 0, result.output
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["step"] == 20


def test_divergence_after_good_steps_keeps_the_last_good_checkpoint(tmp_path):
    source = text_file(tmp_path)
    train(tiny_config(source, "train.max_iters=10"), tmp_path / "run", quiet=True)
    cfg = resume_config(tmp_path / "run", None, ["train.max_iters=20", "train.lr=1e6",
                                                 "train.lr_decay_iters=20", "train.eval_interval=1"])
    with pytest.raises(AttnlmError, match="the model diverged") as err:
        train(cfg, tmp_path / "run", resume=True, quiet=True)
    found = re.search(r"at step (\d+): .* the checkpoint of step (\d+) is kept", str(err.value))
    diverged_at, kept = map(int, found.groups())
    kept_ckpt = checkpoint.load(tmp_path / "run" / "checkpoint.pt")  # finite weights, verified
    assert 10 <= kept_ckpt["step"] == kept < diverged_at
    assert math.isfinite(kept_ckpt["best_val_loss"])


def test_resume_refuses_a_changed_source(tmp_path):
    source = text_file(tmp_path)
    train(tiny_config(source, "train.max_iters=2"), tmp_path / "run", quiet=True)
    source.write_text(source.read_text().replace("lazy", "idle"))
    cfg = resume_config(tmp_path / "run", None, ["train.max_iters=4"])
    with pytest.raises(InputError, match="changed since this run started"):
        train(cfg, tmp_path / "run", resume=True, quiet=True)


def sets(*overrides):
    return [x for o in overrides for x in ("--set", o)]


@pytest.mark.parametrize("content, overrides, message", [
    ("caf\xe9 au lait\n".encode("latin-1") * 20, [], "is not UTF-8 text"),
    (b"abcdef", [], "needs at least 33"),
    (TEXT.encode(), ["model.attention=triton"], "needs a CUDA device"),
    (TEXT.encode(), ["train.device=cuda"], "no CUDA device is available"),
])
def test_dry_run_makes_every_check_train_makes(tmp_path, monkeypatch, content, overrides, message):
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    elif "cuda" in message or "CUDA" in message:
        pytest.skip("this machine has CUDA")
    (tmp_path / "t.txt").write_bytes(content)
    args = sets(f"data.source={tmp_path / 't.txt'}", *TINY, *overrides)
    for extra in (["--dry-run"], []):
        result = invoke("train", *args, "--out", tmp_path / "r", *extra)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert not (tmp_path / "r").exists()  # nothing left behind, not even an empty folder


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
    result = invoke("train", "--dry-run", "--out", tmp_path / "r",
                    *sets(f"data.source={text_file(tmp_path)}", *TINY))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["train"]["lr_decay_iters"] == 20
    assert not (tmp_path / "r").exists()


def test_the_first_step_is_adamws_first_step(tmp_path):
    # Adam's bias correction makes its first update lr·g/(|g| + eps): lr for every weight with a
    # gradient. The checkpoint written before the first step must not have counted a step.
    cfg = tiny_config(text_file(tmp_path), "train.max_iters=1", "train.warmup_iters=0",
                      "train.weight_decay=0", "train.grad_clip=0")
    train(cfg, tmp_path / "run", quiet=True)
    saved = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    torch.manual_seed(cfg.train.seed)
    start = GPT(cfg.model, tokenizer_mod.from_state(saved["tokenizer"]).vocab_size).state_dict()
    moved = torch.cat([(saved["model"][k] - start[k]).abs().flatten() for k in start])
    ratios = moved[moved > 0] / lr_at(0, cfg.train)
    assert ratios.median() == pytest.approx(1.0, abs=1e-3) and ratios.max() < 1.001
    assert {s["step"].item() for s in saved["optimizer"]["state"].values()} == {1.0}


def test_resume_takes_the_new_optimizer_settings_and_refuses_another_optimizer(tmp_path):
    train(tiny_config(text_file(tmp_path), "train.max_iters=2"), tmp_path / "run", quiet=True)
    new = ["train.max_iters=4", "train.weight_decay=0.5", "train.beta1=0.5"]
    train(resume_config(tmp_path / "run", None, new), tmp_path / "run", resume=True, quiet=True)
    groups = checkpoint.load(tmp_path / "run" / "checkpoint.pt")["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.5, (0.5, 0.99)),
                                                                          (0.0, (0.5, 0.99))]
    with pytest.raises(InputError, match="cannot change train.optimizer"):
        resume_config(tmp_path / "run", None, ["train.optimizer=muon"])


def test_a_full_disk_while_logging_stops_with_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import builtins
    import errno

    from attnlm import run as run_mod

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(run_mod, "open", full_disk, raising=False)
    cfg = tiny_config(text_file(tmp_path))
    with pytest.raises(AttnlmError, match=r"cannot write .*metrics.jsonl: no space left on the device"):
        train(cfg, tmp_path / "run", quiet=True)
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["step"] == 0
