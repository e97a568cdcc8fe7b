"""A decode step's split weight products against nn.Linear's own (the reference), and the
choice between the two forms."""

import pytest
import torch

from attnlm import decode_products
from attnlm.decode_products import Split, split_is_faster, split_linear, splittable
from attnlm.config import ModelConfig
from attnlm.model import GPT


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 1, 48), (2, 5, 48)])
def test_split_linear_computes_the_layers_product(bias, shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 4 * 36, bias=bias).double()
    x = torch.randn(shape, dtype=torch.float64)
    assert torch.allclose(split_linear(layer, x), layer(x), rtol=1e-12, atol=1e-12)


def test_split_layers_compute_through_split_linear_inside_only(monkeypatch):
    calls = []
    monkeypatch.setattr(decode_products, "split_linear",
                        lambda layer, x: calls.append(layer) or split_linear(layer, x))
    model = GPT(ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=32), 65)
    layers = splittable(model)
    assert layers and model.head not in layers  # 65 rows do not split in four
    x = torch.randn(1, 1, 32)
    with Split(layers):
        inside = layers[0](x)
    outside = layers[0](x)
    assert calls == [layers[0]] and not any("forward" in vars(m) for m in model.modules())
    assert torch.allclose(inside, outside, atol=1e-6)


def test_a_layer_whose_forward_is_replaced_already_is_left_alone():
    model = GPT(ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=32), 65)
    own = model.blocks[0].mlp.fc.forward = lambda x: x
    assert model.blocks[0].mlp.fc not in splittable(model)
    assert model.blocks[0].mlp.fc.forward is own


def test_split_linear_keeps_the_dtype_autocast_gives():
    layer = torch.nn.Linear(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert split_linear(layer, torch.randn(1, 32)).dtype == layer(torch.randn(1, 32)).dtype


@pytest.mark.parametrize("split_seconds, wins", [(1.0, True), (3.0, False)])
def test_the_faster_form_is_kept_and_measured_once(monkeypatch, split_seconds, wins):
    """The form whose fastest timing is lower wins; a second ask for the same shapes, batch
    and threads is answered without timing again."""
    monkeypatch.setattr(decode_products, "_split_wins", {})
    timed = []

    def seconds(form, layers, inputs):
        timed.append(form)
        return split_seconds if form is split_linear else 2.0

    monkeypatch.setattr(decode_products, "_seconds", seconds)
    layers = splittable(GPT(ModelConfig(block_size=8, n_layer=1, n_head=2, n_embd=32), 65))
    assert split_is_faster(layers, 1) is wins
    assert len(timed) == 2 * decode_products.REPEATS
    assert split_is_faster(layers, 1) is wins and len(timed) == 2 * decode_products.REPEATS
    split_is_faster(layers, 2)
    assert len(timed) == 4 * decode_products.REPEATS
