"""Positional schemes: RoPE's and ALiBi's relative properties against hand-computed values,
permutation equivariance without positions, sinusoids as rotations, cached against uncached
decoding for every scheme, and `eval --block-size` past the trained context."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from attnlm.attention import naive, sdpa, tiled
from attnlm.attention.masks import alibi_bias
from attnlm.cli import cli
from attnlm.config import build_config
from attnlm.model import GPT, Attention
from attnlm.positional import SCHEMES, Rotary, Sinusoidal, alibi_slopes
from attnlm.sampling import Controls, generate
from attnlm.train import train
from tests.helpers import spread, text_file, tiny_config

BACKENDS = {"naive": naive.attend, "sdpa": sdpa.attend, "tiled": tiled.attend}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny(*overrides, block=16, vocab=50):
    cfg = build_config(overrides=["model.n_layer=2", "model.n_head=3", "model.n_embd=48",
                                  f"model.block_size={block}", *overrides])
    torch.manual_seed(0)
    return GPT(cfg.model, vocab)


# RoPE.

def rotate_by_hand(x, positions, base):
    """RoPE written out pair by pair in float64: pair (i, i + D/2) of the vector at position p
    turns by the angle p·base^(-2i/D)."""
    d = x.size(-1)
    out = x.double().clone()
    for t, p in enumerate(positions):
        for i in range(d // 2):
            angle = p * base ** (-2 * i / d)
            a, b = x[..., t, i].double(), x[..., t, i + d // 2].double()
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + d // 2] = a * math.sin(angle) + b * math.cos(angle)
    return out


@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_rope_matches_rotations_written_out_by_hand(base):
    x = randn(2, 3, 5, 8)
    got = Rotary(8, base)(x, 11)
    torch.testing.assert_close(got.double(), rotate_by_hand(x, range(11, 16), base), atol=1e-5,
                               rtol=1e-5)


def test_rope_gradient_is_autograds_of_the_rotation_by_hand():
    # The hand-written backward (the opposite rotation) against autograd through rotate_by_hand;
    # a second call after a longer one reads the grown tables.
    rope = Rotary(8, 10000.0)
    rope(randn(1, 1, 40, 8), 0)
    x = randn(2, 3, 5, 8).requires_grad_()
    weights = randn(2, 3, 5, 8)
    (rope(x, 11) * weights).sum().backward()
    reference = x.detach().clone().requires_grad_()
    (rotate_by_hand(reference, range(11, 16), 10000.0) * weights.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), reference.grad.double(), atol=1e-5, rtol=1e-5)


def test_rope_far_positions_are_exact_and_keep_no_growing_table(monkeypatch):
    # An endless generation (every layer windowed) reaches positions past the kept tables and
    # past 2^24, where float32 positions lose their units digit.
    monkeypatch.setattr(Rotary, "KEPT_POSITIONS", 64)
    rope = Rotary(8, 10000.0)
    x = randn(1, 2, 3, 8)
    for start in (30, 100, 2**24 + 1):
        torch.testing.assert_close(rope(x, start).double(), rotate_by_hand(x, range(start, start + 3), 10000.0),
                                   atol=1e-5, rtol=1e-5)
    assert len(rope._cos) <= 64


def test_rope_keeps_norms():
    x = randn(2, 4, 50, 16)
    rotated = Rotary(16, 10000.0)(x, 123)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rotated, x, atol=1e-3)


def test_rope_score_depends_only_on_the_distance():
    rope = Rotary(16, 10000.0)
    q, k = randn(1, 2, 20, 16, seed=1), randn(1, 2, 20, 16, seed=2)

    def scores(start):
        # Queries and keys at positions start .. start + 19.
        return rope(q, start) @ rope(k, start).transpose(-2, -1)

    base = scores(0)
    for shift in (1, 37, 1000):
        torch.testing.assert_close(scores(shift), base, atol=1e-4, rtol=1e-4)
    # Moving only the keys changes the distance, and the scores with it.
    moved = rope(q, 0) @ rope(k, 5).transpose(-2, -1)
    assert not torch.allclose(moved, base, atol=1e-2)


# ALiBi.

def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(4).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]
    # Not a power of two: the 4 slopes, then the 8-head sequence's 1st and 3rd, which lie between.
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1,
                                        2.0 ** -3]


def test_alibi_bias_is_minus_slope_times_distance():
    bias = alibi_bias(torch.tensor([0.5]), 2, 3, causal=True)[0]  # queries at positions 1 and 2
    assert bias.tolist() == [[-0.5, 0.0, 0.5], [-1.0, -0.5, 0.0]]  # past the diagonal: masked
    both_ways = alibi_bias(torch.tensor([0.5]), 2, 3, causal=False)[0]
    assert both_ways.tolist() == [[-0.5, 0.0, -0.5], [-1.0, -0.5, 0.0]]


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_is_unchanged_when_every_position_shifts(causal):
    slopes = alibi_slopes(4)
    bias = alibi_bias(slopes, 10, 10, causal)
    for shift in (1, 25):
        # The lower right block of a longer sequence: queries and keys at positions shift ..
        shifted = alibi_bias(slopes, 10 + shift, 10 + shift, causal)[:, shift:, shift:]
        torch.testing.assert_close(shifted, bias)


@pytest.mark.parametrize("pos, moves", [("rope", False), ("alibi", False), ("none", False),
                                        ("learned", True), ("sinusoidal", True)])
def test_relative_schemes_ignore_where_a_text_starts(pos, moves):
    model = tiny(f"model.pos={pos}", block=32).eval()
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        at_start, shifted = model(idx)[0], model(idx, pos=17)[0]
    assert torch.allclose(at_start, shifted, atol=1e-5) != moves


# No positions: permutation equivariance.

@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_without_positions_or_mask_is_permutation_equivariant(backend):
    attend = BACKENDS[backend]
    q, k, v = randn(2, 3, 30, 16, seed=1), randn(2, 3, 30, 16, seed=2), randn(2, 3, 30, 16, seed=3)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    out = attend(q, k, v, causal=False, scale=0.25)
    permuted = attend(q[:, :, perm], k[:, :, perm], v[:, :, perm], causal=False, scale=0.25)
    torch.testing.assert_close(permuted, out[:, :, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos, equivariant", [("none", True), ("rope", False), ("alibi", False)])
def test_an_attention_layer_is_permutation_equivariant_only_without_positions(pos, equivariant):
    cfg = build_config(overrides=["model.n_head=2", "model.n_embd=32", f"model.pos={pos}"]).model
    torch.manual_seed(0)
    layer = Attention(cfg, 0).eval()
    backend = layer.attend
    layer.attend = lambda q, k, v, **kw: backend(q, k, v, **{**kw, "causal": False})
    x = randn(1, 20, 32)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = torch.allclose(layer(x[:, perm])[0], layer(x)[0][:, perm], atol=1e-5)
    assert same == equivariant


# Sinusoidal.

def test_sinusoidal_shift_is_a_fixed_rotation_of_each_pair():
    dim = 16
    table = Sinusoidal(0, dim)(0, 300)
    for shift in (1, 7, 100):
        for i in range(dim // 2):
            b = shift * 10000.0 ** (-2 * i / dim)
            # (sin, cos) of (p + k)w from those of pw: sin(a+b) = sin a cos b + cos a sin b,
            # cos(a+b) = cos a cos b - sin a sin b. One matrix for every p.
            rotation = torch.tensor([[math.cos(b), math.sin(b)], [-math.sin(b), math.cos(b)]])
            pair = table[:, 2 * i: 2 * i + 2]
            torch.testing.assert_close(pair[:-shift] @ rotation.T, pair[shift:], atol=1e-4,
                                       rtol=0)


# Half a unit in the last place of values under 0.02 (< 2^-5): the exact value rounded once.
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2**-30), (torch.bfloat16, 2**-14)])
def test_sinusoidal_far_positions_are_exact_in_the_models_dtype(dtype, atol):
    """Past 2^24 a float32 position loses its units digit; a model cast to bfloat16 gets the
    table in its dtype, rounded once."""
    dim = 8
    table = Sinusoidal(0, dim).to(dtype)(2**25 + 1, 3)
    assert table.dtype == dtype
    for row, p in enumerate(range(2**25 + 1, 2**25 + 4)):
        for i in range(dim // 2):
            angle = p * 10000.0 ** (-2 * i / dim)
            expected = torch.tensor([math.sin(angle), math.cos(angle)], dtype=torch.float64)
            torch.testing.assert_close(table[row, 2 * i: 2 * i + 2].double(),
                                       expected * Sinusoidal.AMPLITUDE, atol=atol, rtol=0)


@pytest.mark.parametrize("pos", SCHEMES)
def test_a_model_cast_to_bfloat16_runs_with_every_scheme(pos):
    model = tiny(f"model.pos={pos}").to(torch.bfloat16)
    logits = model(torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1)))[0]
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()


# Cached against uncached, for every scheme.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pos", SCHEMES)
def test_cached_steps_give_the_logits_of_a_full_forward(pos, backend):
    model = tiny(f"model.pos={pos}", f"model.attention={backend}").eval()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        full = model(idx)[0]
        steps = [model(idx[:, :5], cache=cache)[0]]
        steps += [model(idx[:, p:p + 1], cache=cache)[0] for p in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", SCHEMES)
def test_cached_and_uncached_greedy_decoding_agree(pos):
    model = spread(tiny(f"model.pos={pos}", "model.attention=tiled")).eval()
    prompt = torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]])

    def decode(use_cache):
        steps = generate(model, prompt, 40, Controls(temperature=0), use_cache=use_cache)
        return torch.stack(list(steps), 1).tolist()

    assert decode(True) == decode(False)  # 40 tokens: the 16-token window restarts 4 times


def test_rope_keys_are_cached_rotated_at_their_absolute_position():
    model = tiny("model.pos=rope").eval()
    idx = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        model(idx[:, :4], cache=cache)
        model(idx[:, 4:], cache=cache)
        layer = model.blocks[0]
        x = layer.norm1(model.tok_emb(idx))
        k = layer.attn.qkv(x).split(48, 2)[1].view(1, 9, 3, 16).transpose(1, 2)
    want = rotate_by_hand(k, range(9), 10000.0).float()
    torch.testing.assert_close(cache.layers[0].keys[:, :, :9], want, atol=1e-5, rtol=1e-5)


# eval --block-size.

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("positional")
    source = text_file(tmp)
    for pos in ("learned", "rope"):
        train(tiny_config(source, f"model.pos={pos}", "train.max_iters=4",
                          "train.eval_interval=4"), tmp / pos, quiet=True)
    return tmp


def evaluate(*args):
    return CliRunner().invoke(cli, ["eval", *(str(a) for a in args)])


def test_eval_reads_longer_windows_than_trained_with_rope(runs, monkeypatch):
    lengths = []
    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, idx, *a, **k: lengths.append(idx.size(1))
                        or forward(self, idx, *a, **k))
    for block in (32, 64, 128):  # trained at 32
        lengths.clear()
        result = evaluate(runs / "rope", "--block-size", block, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["block_size"] == block and math.isfinite(report["loss"])
        assert max(lengths) == block  # the model read windows of that length


def test_eval_refuses_a_longer_context_for_learned_positions(runs):
    result = evaluate(runs / "learned", "--block-size", 64)
    assert result.exit_code == 2
    assert "positions only up to block_size=32" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert evaluate(runs / "learned", "--block-size", 16, "--json").exit_code == 0
