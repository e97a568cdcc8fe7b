"""train.compile: the same training as without it, and checkpoints that load either way."""

import pytest
import torch

from attnlm import train as train_mod
from attnlm.errors import AttnlmError
from attnlm.run import load_checkpoint, load_model
from attnlm.train import resume_config, train
from tests.helpers import text_file, tiny_config, train_curve

STEPS = ["train.max_iters=6", "train.eval_interval=3", "train.lr_decay_iters=6"]


def losses(run):
    curve = train_curve(run)
    assert [step for step, _ in curve] == list(range(1, 7))
    return [loss for _, loss in curve]


@pytest.mark.slow
def test_compiled_training_matches_eager_and_checkpoints_load_either_way(tmp_path):
    source = text_file(tmp_path)
    eager = train(tiny_config(source, *STEPS), tmp_path / "eager", quiet=True)
    compiled = train(tiny_config(source, *STEPS, "train.compile=true"), tmp_path / "compiled",
                     quiet=True)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
    assert compiled["compile_s"] > 0 and eager["compile_s"] is None
    # Saved by a compiled run, loaded by a plain model (load_model loads strictly).
    saved = load_checkpoint(tmp_path / "compiled")["model"]
    assert saved.keys() == load_checkpoint(tmp_path / "eager")["model"].keys()
    model = load_model(tmp_path / "compiled")[0]
    for name, tensor in saved.items():
        assert torch.equal(model.state_dict()[name], tensor)
    # Saved by a plain run, resumed compiled: the uninterrupted eager run's steps.
    train(tiny_config(source, *STEPS, "train.max_iters=3"), tmp_path / "resumed", quiet=True)
    cfg = resume_config(tmp_path / "resumed", None, ["train.max_iters=6", "train.compile=true"])
    train(cfg, tmp_path / "resumed", resume=True, quiet=True)
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


def test_a_failed_compilation_is_one_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(train_mod, "compiled", lambda module: torch.compile(module, backend=broken))
    message = r"torch.compile failed \(no C\+\+ compiler found\).*train.compile=false"
    with pytest.raises(AttnlmError, match=message):
        train(tiny_config(text_file(tmp_path), *STEPS, "train.compile=true"), tmp_path / "run",
              quiet=True)
    assert load_checkpoint(tmp_path / "run")["step"] == 0
