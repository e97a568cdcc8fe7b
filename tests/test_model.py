import ast
import math
from pathlib import Path

import pytest
import torch

from attnlm.config import build_config
from attnlm import model as model_module
from attnlm.model import GPT


def tiny(*overrides, vocab=50):
    cfg = build_config(overrides=["model.n_layer=2", "model.n_head=2", "model.n_embd=32",
                                  "model.block_size=16", *overrides])
    torch.manual_seed(0)
    return GPT(cfg.model, vocab)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "none"])
def test_output_shapes(pos):
    model = tiny(f"model.pos={pos}")
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 50) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == ()


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
def test_causal_later_tokens_never_change_earlier_logits(attention):
    model = tiny(f"model.attention={attention}").eval()
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    before, after = model(idx)[0], model(changed)[0]
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:], atol=1e-3)


def test_naive_and_sdpa_models_agree_in_outputs_and_gradients():
    idx = torch.randint(0, 50, (2, 16))
    results = []
    for attention in ["naive", "sdpa"]:
        model = tiny(f"model.attention={attention}")  # same seed: same weights
        logits, loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        results.append((logits, [p.grad for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_initial_loss_is_close_to_uniform():
    model = tiny(vocab=65)
    idx = torch.randint(0, 65, (8, 16))
    _, loss = model(idx, torch.randint(0, 65, (8, 16)))
    assert abs(loss.item() - math.log(65)) < 0.1


def test_residual_projections_are_scaled_and_head_is_tied():
    model = tiny("model.n_layer=8")
    std = model.blocks[0].mlp.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert model.head.weight is model.tok_emb.weight


def test_learned_positions_refuse_past_their_table():
    model = tiny()
    with pytest.raises(ValueError, match="learned positions stop at 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_sinusoidal_positions_are_hand_checkable():
    model = tiny("model.pos=sinusoidal")
    # dim 32: pairs 0.02·(sin, cos) at frequencies 10000^(-2i/32)
    table = model.pos_emb(0, 3) / 0.02
    assert torch.allclose(table[0, 0::2], torch.zeros(16)) and torch.allclose(table[0, 1::2], torch.ones(16))
    assert table[2, 0].item() == pytest.approx(math.sin(2.0), abs=1e-5)
    assert table[2, 3].item() == pytest.approx(math.cos(2.0 * 10000 ** (-2 / 32)), abs=1e-5)


def test_tiny_model_overfits_a_tiny_text():
    model = tiny("model.block_size=8", vocab=10)
    data = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]])
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert torch.equal(model(x)[0].argmax(-1), y)


def test_the_model_imports_only_torch_and_its_own_parts():
    """model.py is plain torch: the chosen attention backend is what runs, nothing else."""
    tree = ast.parse(Path(model_module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    own = {"attnlm.attention", "attnlm.kv_cache", "attnlm.positional"}
    assert imported - own and all(name in ("math", "torch") or name.startswith("torch.")
                                  for name in imported - own), imported
