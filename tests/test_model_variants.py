"""The model's variants against models that compute the same thing another way: grouped-query
attention as multi-head attention with repeated key/value weights, a temperature as scaled query
weights, residual scaling as scaled output projections, QK-norm's invariance to the scale of the
queries and keys, and the head-similarity penalty against hand-computed values."""

import math
import warnings

import pytest
import torch

from attnlm.config import build_config
from attnlm.model import GPT, RMSNorm, head_similarity, kv_heads, layer_windows, mlp_width
from attnlm.run import load_model
from attnlm.train import train
from tests.helpers import text_file, tiny_config, train_curve

VOCAB = 40


def config(*overrides):
    return build_config(overrides=["model.n_layer=2", "model.n_head=4", "model.n_embd=32",
                                   "model.block_size=24", "model.attention=naive",
                                   *overrides]).model


def model(*overrides, seed=0):
    torch.manual_seed(seed)
    return GPT(config(*overrides), VOCAB).eval()


def logits(m, idx):
    with torch.no_grad():
        return m(idx)[0]


IDX = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def q_rows(m, layer):
    """The rows of a layer's fused qkv weight that make the queries."""
    n = m.cfg.n_head * (m.cfg.n_embd // m.cfg.n_head)
    return m.blocks[layer].attn.qkv.weight[:n]


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_weights(n_kv_head):
    gqa = model(f"model.n_kv_head={n_kv_head}")
    mha = model()
    group, d = 4 // n_kv_head, 8
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith("attn.qkv.weight"):
            q, k, v = w.split((4 * d, n_kv_head * d, n_kv_head * d))
            # Key/value head j serves query heads j·group .. (j+1)·group - 1.
            repeat = lambda t: t.view(n_kv_head, d, -1).repeat_interleave(group, 0).reshape(4 * d, -1)
            state[name] = torch.cat((q, repeat(k), repeat(v)))
    mha.load_state_dict(state)
    assert gqa.blocks[0].attn.qkv.weight.shape == ((4 + 2 * n_kv_head) * d, 32)
    torch.testing.assert_close(logits(gqa, IDX), logits(mha, IDX), atol=1e-5, rtol=1e-5)


def test_kv_heads_and_windows_per_layer():
    assert kv_heads(config()) == 4 and kv_heads(config("model.n_kv_head=1")) == 1
    assert layer_windows(config()) == [0, 0]
    assert layer_windows(config("model.n_layer=6", "model.window=5")) == [5] * 6
    assert layer_windows(config("model.n_layer=6", "model.window=5",
                                "model.window_pattern=SSSL")) == [5, 5, 5, 0, 5, 5]


def test_a_window_as_long_as_the_context_is_full_attention_and_a_short_one_is_not():
    full = model()
    wide, narrow = model("model.window=24"), model("model.window=3")
    torch.testing.assert_close(logits(wide, IDX), logits(full, IDX))
    differs = (logits(narrow, IDX) - logits(full, IDX)).abs().amax(-1)[0]
    assert differs[:3].max() < 1e-5 and differs[3:].min() > 1e-4  # the first 3 see all they would


def test_temperature_divides_the_scores_as_smaller_query_weights_would():
    hot, plain = model("model.attn_temperature=4"), model()
    with torch.no_grad():
        for layer in range(2):
            q_rows(plain, layer).div_(4)
    torch.testing.assert_close(logits(hot, IDX), logits(plain, IDX), atol=1e-5, rtol=1e-5)


def test_residual_scale_multiplies_each_branch_as_scaled_output_projections_would():
    scaled, plain = model("model.residual_scale=0.3"), model()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(0.3)
    torch.testing.assert_close(logits(scaled, IDX), logits(plain, IDX), atol=1e-5, rtol=1e-5)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    normed = model("model.qk_norm=true")
    before = logits(normed, IDX)
    with torch.no_grad():
        for layer in range(2):
            normed.blocks[layer].attn.qkv.weight[:64].mul_(7.0)  # the query and key rows
    torch.testing.assert_close(logits(normed, IDX), before, atol=1e-4, rtol=1e-4)
    plain = model()
    with torch.no_grad():
        q_rows(plain, 0).mul_(7.0)
    assert not torch.allclose(logits(plain, IDX), logits(model(), IDX), atol=1e-3)


def test_qk_norm_hands_attention_queries_and_keys_in_the_values_dtype(monkeypatch):
    """CUDA's autocast computes rms_norm in float32, the CPU's in the input's dtype: whichever it
    is, the backend gets q, k and v in one dtype (triton's kernels refuse a mix)."""
    def float32_rms_norm(x, *args):  # as CUDA's autocast runs it
        return real_rms_norm(x.float(), *(a.float() if torch.is_tensor(a) else a for a in args))

    real_rms_norm = torch.nn.functional.rms_norm
    monkeypatch.setattr("attnlm.model.F.rms_norm", float32_rms_norm)
    m = model("model.qk_norm=true", "model.norm=rmsnorm")
    seen = []
    for block in m.blocks:
        attend = block.attn.attend
        block.attn.attend = lambda q, k, v, attend=attend, **o: seen.append(
            (q.dtype, k.dtype, v.dtype)) or attend(q, k, v, **o)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(IDX)
    assert seen == [(torch.bfloat16,) * 3] * 2


def test_a_huge_softcap_changes_nothing_and_a_small_one_does():
    plain = model()
    torch.testing.assert_close(logits(model("model.softcap=1e6"), IDX), logits(plain, IDX))
    with torch.no_grad():
        for layer in range(2):
            q_rows(plain, layer).mul_(30.0)  # sharp attention, which a cap of 1 flattens
    capped = model("model.softcap=1")
    capped.load_state_dict(plain.state_dict())
    assert not torch.allclose(logits(capped, IDX), logits(plain, IDX), atol=1e-3)


def test_mlp_widths_and_what_each_mlp_computes():
    assert mlp_width(config()) == 128 and mlp_width(config("model.mlp_hidden=40")) == 40
    assert mlp_width(config("model.mlp=swiglu")) == 88  # 8/3 · 32 = 85.3, up to a multiple of 8
    x = torch.randn(3, 32)
    for kind, act in [("relu2", lambda h: torch.relu(h) ** 2),
                      ("swiglu", lambda h: torch.nn.functional.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]),
                      ("gelu", torch.nn.functional.gelu)]:
        mlp = model(f"model.mlp={kind}").blocks[0].mlp
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), mlp.proj(act(mlp.fc(x))))


def test_swiglu_has_about_the_parameters_of_the_gelu_mlp():
    gelu, swiglu = model(), model("model.mlp=swiglu")
    assert abs(swiglu.num_params() / gelu.num_params() - 1) < 0.02


def test_rmsnorm_layers_have_gains_only():
    m = model("model.norm=rmsnorm")
    assert isinstance(m.norm, torch.nn.RMSNorm) and m.norm.eps == 1e-6
    assert not any(name.endswith("norm1.bias") for name, _ in m.named_parameters())


def test_relative_bias_starts_at_zero_as_a_model_without_positions():
    relative, none = model("model.pos=relative"), model("model.pos=none")
    none.load_state_dict(relative.state_dict(), strict=False)
    torch.testing.assert_close(logits(relative, IDX), logits(none, IDX))
    table = relative.blocks[0].attn.relative.table
    assert table.shape == (4, 32) and table.requires_grad


def test_head_similarity_by_hand():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    same = torch.stack([a, a, a]).view(1, 3, 1, 2)
    assert head_similarity(same).item() == pytest.approx(1.0)
    orthogonal = torch.stack([a, b]).view(1, 2, 1, 2)
    assert head_similarity(orthogonal).item() == pytest.approx(0.0)
    opposite = torch.stack([a, -a]).view(1, 2, 1, 2)
    assert head_similarity(opposite).item() == pytest.approx(-1.0)
    # Three heads at 0°, 60° and 120°: pairs' cosines 0.5, -0.5 and 0.5, mean 1/6.
    angles = torch.tensor([0.0, math.pi / 3, 2 * math.pi / 3])
    heads = torch.stack([angles.cos(), angles.sin()], -1).view(1, 3, 1, 2)
    assert head_similarity(heads).item() == pytest.approx(1 / 6, abs=1e-6)


def test_the_head_diversity_penalty_adds_its_weight_times_the_mean_similarity():
    m = model()
    targets = IDX.roll(-1, 1)
    plain = m(IDX, targets)[1]
    penalised = m(IDX, targets, head_diversity=0.5)[1]
    outputs = []
    hooks = [b.attn.register_forward_hook(lambda mod, inp, out: outputs.append(out[1]))
             for b in m.blocks]
    m(IDX)
    for h in hooks:
        h.remove()
    expected = plain + 0.5 * torch.stack([head_similarity(y) for y in outputs]).mean()
    torch.testing.assert_close(penalised, expected)
    assert m(IDX, targets, head_diversity=0.5)[1].requires_grad


def test_additive_scoring_trains_its_vector():
    m = model("model.score=additive").train()
    loss = m(IDX, IDX.roll(-1, 1))[1]
    loss.backward()
    assert m.blocks[0].attn.additive.grad.abs().sum() > 0


LLAMA = ["model.pos=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.n_kv_head=1"]
EVERYTHING = [*LLAMA, "model.qk_norm=true", "model.softcap=20", "model.window=8",
              "model.window_pattern=SL", "model.residual_scale=0.7", "train.head_diversity=0.1"]


@pytest.mark.parametrize("overrides", [LLAMA, EVERYTHING, ["model.pos=relative", "model.score=additive"]],
                         ids=["llama", "everything", "relative-additive"])
def test_variants_train_save_and_load(tmp_path, overrides):
    cfg = tiny_config(text_file(tmp_path), "model.attention=naive", *overrides)
    summary = train(cfg, tmp_path / "run", quiet=True)
    losses = [loss for _, loss in train_curve(tmp_path / "run")]
    assert losses[-1] < losses[0] - 0.3, losses  # it learns
    loaded, *_ = load_model(tmp_path / "run")
    assert loaded.cfg == cfg.model and math.isfinite(summary["val_loss"])


def test_additive_scores_are_the_direct_formula():
    from attnlm.attention import naive

    g = torch.Generator().manual_seed(3)
    q, k, w = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(4, 8, generator=g)
    keys = k.repeat_interleave(2, dim=1)
    direct = torch.einsum("bhijd,hd->bhij", torch.tanh(q[:, :, :, None] + keys[:, :, None]), w)
    torch.testing.assert_close(naive.scores(q, k, causal=False, scale=0.5, additive=w), 0.5 * direct)


def test_the_relative_bias_depends_on_distance_alone():
    from attnlm.attention.masks import relative_bias, relative_buckets

    table = torch.randn(3, 8)
    relative = (table, relative_buckets(40, 8, 16))
    short, long = relative_bias(relative, 10, 10, True), relative_bias(relative, 30, 30, True)
    for shift in (1, 7, 20):
        torch.testing.assert_close(long[:, shift:shift + 10, shift:shift + 10], short)
    # By hand: distance 2 is bucket 2; distances 16 and beyond share the last bucket.
    assert torch.equal(short[:, 5, 3], table[:, 2]) and torch.equal(long[:, 29, 0], table[:, 7])


def test_rmsnorm_under_bfloat16_autocast_takes_the_fused_path_and_matches_float32():
    """Queries and keys reach QK-norm in bfloat16 under autocast; a float32 gain would make torch
    warn and fall back to its unfused kernel."""
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = norm(x.bfloat16())
    assert got.dtype == torch.bfloat16
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(got.float(), want.detach(), rtol=2e-2, atol=2e-2)
