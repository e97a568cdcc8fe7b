import json

import pytest
import torch
from click.testing import CliRunner

from attnlm import propagation
from attnlm.cli import cli
from attnlm.config import ModelConfig
from attnlm.errors import InputError
from attnlm.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 11


def tiny_model(seed=3, **changes):
    """A model small enough that its blocks' whole Jacobians are 32 x 32, as configured (its
    own backend), with the weights initial_model gives for the same seed."""
    cfg = ModelConfig(**{"block_size": 4, "n_layer": 3, "n_head": 2, "n_embd": 8, **changes})
    torch.manual_seed(seed)
    return GPT(cfg, VOCAB).eval()


def direct_streams(model, ids):
    """The residual stream before the first block and after each, computed step by step."""
    x = model.tok_emb(ids)
    if model.pos_emb is not None:
        x = x + model.pos_emb(0, ids.size(1))
    streams = [x]
    for block in model.blocks:
        streams.append(block(streams[-1]))
    return streams


def report_of(model, tokens, iterations=30):
    twin = propagation.initial_model(model.cfg, VOCAB, seed=3)
    return propagation.propagation(twin, tokens, iterations=iterations)


def test_the_jacobian_norm_of_a_linear_map_is_its_largest_singular_value():
    # f(x) = x A for each row of x: J is A^T once per row, whose singular values are A's.
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    a = rotation @ torch.diag(torch.tensor([3.0, 1.0, 0.5])) @ rotation.T
    x = torch.randn(2, 3)
    norm = propagation.jacobian_norm(lambda x: x @ a, x, 50, torch.Generator().manual_seed(1))
    assert norm == pytest.approx(3.0, rel=1e-5)


@pytest.mark.parametrize("pos, attention", [("learned", "sdpa"), ("rope", "tiled"),
                                            ("alibi", "naive")])
def test_each_blocks_jacobian_norm_is_the_largest_singular_value_of_its_full_jacobian(pos,
                                                                                      attention):
    model = tiny_model(pos=pos, attention=attention)
    tokens = propagation.random_tokens(VOCAB, 1, 5, seed=0)
    report = report_of(model, tokens, iterations=200)
    streams = direct_streams(model, tokens[:, :-1])
    for layer, block, x in zip(report["layers"], model.blocks, streams):
        full = torch.autograd.functional.jacobian(block, x).reshape(x.numel(), x.numel())
        largest = torch.linalg.matrix_norm(full, 2).item()
        assert layer["jacobian_norm"] == pytest.approx(largest, rel=1e-3)
        assert largest > 1.01  # not the identity: the branch counts


def test_growth_and_gradients_are_those_of_a_direct_computation():
    model = tiny_model(pos="learned", n_kv_head=1)
    tokens = propagation.random_tokens(VOCAB, 3, 5, seed=1)
    report = report_of(model, tokens)
    streams = direct_streams(model, tokens[:, :-1])
    logits = model.head(model.norm(streams[-1]))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    weights = [block.attn.qkv.weight for block in model.blocks]
    grads = torch.autograd.grad(loss, [*streams[:-1], *weights])
    # 2 query heads and 1 key/value head of 4 dimensions: q and k are the first 12 of 16 rows
    qk_grads = [g[:12] for g in grads[len(streams) - 1:]]
    assert report["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for i, layer in enumerate(report["layers"]):
        rms_in, rms_out = (streams[i].pow(2).mean().sqrt().item(),
                           streams[i + 1].pow(2).mean().sqrt().item())
        assert layer["rms_in"] == pytest.approx(rms_in, rel=1e-6)
        assert layer["growth"] == pytest.approx(rms_out / rms_in, rel=1e-6)
        assert layer["grad_norm"] == pytest.approx(grads[i].norm().item(), rel=1e-5)
        assert layer["qk_grad_norm"] == pytest.approx(qk_grads[i].norm().item(), rel=1e-5)
    assert report["growth"] == pytest.approx(rms_out / report["layers"][0]["rms_in"])


def test_blocks_whose_branches_add_nothing_carry_everything_unchanged():
    model = propagation.initial_model(tiny_model().cfg, VOCAB, seed=3)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):  # each branch's last layer: the branch adds zero
            torch.nn.init.zeros_(p)
    report = propagation.propagation(model, propagation.random_tokens(VOCAB, 2, 5, seed=2))
    first = report["layers"][0]["grad_norm"]
    for layer in report["layers"]:
        assert layer["growth"] == pytest.approx(1.0)
        assert layer["jacobian_norm"] == pytest.approx(1.0, rel=1e-5)  # the identity's
        assert layer["grad_norm"] == pytest.approx(first, rel=1e-6)


def test_inspect_prints_the_report_of_a_configured_model_at_initialisation():
    args = ["inspect", "--set", "model.n_layer=3", "--set", "model.n_embd=16", "--set",
            "model.block_size=8", "--set", "train.threads=1", "--vocab-size", "20",
            "--batch-size", "2", "--iterations", "5"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_layer"] == 3 and report["tokens"] == 8 and report["batch_size"] == 2
    assert [layer["layer"] for layer in report["layers"]] == [0, 1, 2]
    assert report["uniform_loss"] == pytest.approx(torch.log(torch.tensor(20.0)).item())
    again = CliRunner().invoke(cli, [*args, "--json"])
    assert json.loads(again.stdout) == report  # seeded: the same model, tokens and directions
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0 and "Jacobian norm" in text.stdout
    assert len(text.stdout.splitlines()) == 2 + 3


def test_inspect_refuses_a_bad_config_in_one_line():
    result = CliRunner().invoke(cli, ["inspect", "--set", "model.n_embd=30", "--set",
                                      "model.n_head=4"])
    assert result.exit_code == 2
    assert result.stderr == "error: model.n_embd=30 is not divisible by model.n_head=4\n"


def test_text_windows_are_consecutive_windows_from_the_start():
    tokens = torch.arange(23, dtype=torch.int32)
    assert propagation.text_windows(tokens, 4, 5).tolist() == [
        [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    assert propagation.text_windows(tokens, 9, 10).shape == (2, 10)
    with pytest.raises(InputError, match="the text has 23 tokens; a window needs 24"):
        propagation.text_windows(tokens, 1, 24)


def test_inspect_a_trained_run_reads_its_val_text_with_its_weights(tmp_path):
    from attnlm import api
    from attnlm.data import prepare_training
    from tests.helpers import TINY, text_file

    sets = [x for o in [f"data.source={text_file(tmp_path)}", *TINY] for x in ("--set", o)]
    trained = CliRunner().invoke(cli, ["train", *sets, "--out", str(tmp_path / "run"), "--quiet"])
    assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "run"), "--threads", "1",
                                      "--batch-size", "2", "--iterations", "5", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["text"] == "text" and report["batch_size"] == 2 and report["tokens"] == 32
    # The reference: the run's own model (sdpa) on the first two windows of 33 val tokens.
    run = api.load_run(tmp_path / "run", threads=1)
    val = prepare_training(run.config, run.tokenizer)[1]["val"].tokens[:66]
    windows = torch.as_tensor(val).long().view(2, 33)
    _, loss = run.model(windows[:, :-1], windows[:, 1:])
    assert report["loss"] == pytest.approx(loss.item(), rel=1e-5)
    refused = CliRunner().invoke(cli, ["inspect", str(tmp_path / "run"), "--set", "model.n_layer=3"])
    assert refused.exit_code == 2 and "reads the run's own model" in refused.stderr
