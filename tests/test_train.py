import json
import math

import pytest
import torch

from attnlm import checkpoint
from attnlm.config import build_config
from attnlm.errors import AttnlmError, InputError
from attnlm.runtime import slow_dtype_warning
from attnlm.train import lr_at, resume_config, run_lock, train
from tests.helpers import text_file, tiny_config


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
    # Dropout: the RNG state must resume too. A fixed decay horizon: the same schedule for both.
    same = ["model.dropout=0.1", "train.lr_decay_iters=20"]
    train(tiny_config(source, *same), tmp_path / "full", quiet=True)
    half = tiny_config(source, *same, "train.max_iters=10")
    train(half, tmp_path / "resumed", quiet=True)
    cfg = resume_config(tmp_path / "resumed", None, ["train.max_iters=20"])
    train(cfg, tmp_path / "resumed", resume=True, quiet=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")


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
                                                 "train.grad_clip=0", "train.warmup_iters=0"])
    with pytest.raises(AttnlmError, match=r"loss became (nan|inf) at step 1\d"):
        train(cfg, tmp_path / "run", resume=True, quiet=True)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    cfg = tiny_config(text_file(tmp_path), "train.max_iters=3")
    train(cfg, tmp_path / "run", quiet=True)
    model, tokenizer, loaded_cfg, ckpt = checkpoint.load_model(tmp_path / "run")
    assert loaded_cfg == cfg and ckpt["step"] == 3
    assert tokenizer.decode(tokenizer.encode("the fox")) == "the fox"
    for name, tensor in ckpt["model"].items():
        assert torch.equal(model.state_dict()[name], tensor)


def test_atomic_save_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"step": 1, "w": torch.ones(3)}, path)
    checkpoint.save({"step": 2, "w": torch.zeros(3)}, path)
    assert checkpoint.load(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable attnlm checkpoint"),
    (b"not a zip file at all", "not a readable attnlm checkpoint"),
])
def test_corrupt_checkpoints_are_clear_errors(tmp_path, content, message):
    (tmp_path / "checkpoint.pt").write_bytes(content)
    with pytest.raises(AttnlmError, match=message):
        checkpoint.load(tmp_path / "checkpoint.pt")


def test_checkpoint_format_and_foreign_files(tmp_path):
    torch.save({"format": 99}, tmp_path / "future.pt")
    with pytest.raises(AttnlmError, match="format 99"):
        checkpoint.load(tmp_path / "future.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(AttnlmError, match="not an attnlm checkpoint"):
        checkpoint.load(tmp_path / "list.pt")


def test_loading_never_executes_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('ran')" % str(tmp_path / "pwned"),))

    torch.save({"format": 1, "payload": Boom()}, tmp_path / "evil.pt")
    with pytest.raises(AttnlmError):
        checkpoint.load(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


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
