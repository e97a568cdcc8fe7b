"""train.optimizer: AdamW alone, or Muon for the blocks' matrices and AdamW for the rest."""

import math

import pytest
import torch

from attnlm.config import build_config
from attnlm.errors import InputError
from attnlm.model import GPT
from attnlm.optim import Chained, make_optimizer
from attnlm.train import resume_config, train
from tests.helpers import text_file, tiny_config, train_curve

NS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz coefficients


def model_and_optimizer(*overrides):
    cfg = build_config(overrides=["model.n_layer=1", "model.n_head=1", "model.n_embd=2",
                                  "model.block_size=4", "train.lr=0.1", "train.weight_decay=0.5",
                                  *overrides])
    torch.manual_seed(0)
    model = GPT(cfg.model, 3)
    return model, make_optimizer(model, cfg.train)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model, optimizer = model_and_optimizer("train.optimizer=muon")
    adamw, muon = optimizer.optimizers
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(names[id(p)] for g in muon.param_groups for p in g["params"]) == [
        "blocks.0.attn.proj.weight", "blocks.0.attn.qkv.weight",
        "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"]
    assert "tok_emb.weight" in {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert not isinstance(model_and_optimizer()[1], Chained)  # adamw: one optimizer, as before


def test_one_step_is_the_hand_derived_one():
    model, optimizer = model_and_optimizer("train.optimizer=muon")
    weight, gain = model.blocks[0].attn.proj.weight, model.blocks[0].norm1.weight
    emb = model.tok_emb.weight
    angle = 0.3  # the gradient: 3 times a rotation, whose orthogonal factor is that rotation
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    before = {p: p.detach().clone() for p in (weight, gain, emb)}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    weight.grad = 3 * rotation
    gain.grad = torch.tensor([0.5, -2.0])
    emb.grad = torch.full_like(emb, -1.0)
    optimizer.step()
    # Muon: momentum then Nesterov scale the gradient, normalising undoes it: the rotation's
    # singular values 1/sqrt(2) each go through the quintic five times.
    s = 1 / math.sqrt(2)
    for _ in range(5):
        s = NS[0] * s + NS[1] * s**3 + NS[2] * s**5
    lr = 0.1 * 0.2 * math.sqrt(2)  # scaled to AdamW's step size for a 2 x 2 matrix
    expected = before[weight] * (1 - 0.1 * 0.5) - lr * s * rotation
    assert weight.detach() == pytest.approx(expected, abs=2e-3)  # Newton-Schulz runs in bfloat16
    # AdamW's first step is lr times the gradient's sign; decay on matrices, not on gains.
    assert gain.detach() == pytest.approx(before[gain] - 0.1 * torch.tensor([1.0, -1.0]), abs=1e-6)
    assert emb.detach() == pytest.approx(before[emb] * (1 - 0.1 * 0.5) + 0.1, abs=1e-6)


def test_the_learning_rate_schedule_reaches_both():
    _, optimizer = model_and_optimizer("train.optimizer=muon")
    for group in optimizer.param_groups:
        group["lr"] = 0.01
    assert [g["lr"] for o in optimizer.optimizers for g in o.param_groups] == [0.01] * 3


def test_a_muon_run_resumes_as_if_never_stopped(tmp_path):
    source = text_file(tmp_path)
    same = ["train.optimizer=muon", "train.lr_decay_iters=8", "train.eval_interval=4"]
    train(tiny_config(source, *same, "train.max_iters=8"), tmp_path / "full", quiet=True)
    train(tiny_config(source, *same, "train.max_iters=4"), tmp_path / "resumed", quiet=True)
    cfg = resume_config(tmp_path / "resumed", None, ["train.max_iters=8"])
    train(cfg, tmp_path / "resumed", resume=True, quiet=True)
    assert train_curve(tmp_path / "resumed") == train_curve(tmp_path / "full")
    assert train_curve(tmp_path / "full")[-1][1] < train_curve(tmp_path / "full")[0][1]


def test_muon_is_refused_with_fsdp():
    with pytest.raises(InputError, match="train.optimizer='muon'.*FSDP"):
        build_config(overrides=["train.optimizer=muon", "train.parallel=fsdp"])
