import json
import math

import pytest
import torch
from click.testing import CliRunner

from attnlm import diagnostics
from attnlm.attention import naive
from attnlm.cli import cli
from attnlm.config import ModelConfig
from attnlm.model import GPT
from tests.helpers import TINY, text_file


def test_entropy_of_uniform_attention_over_T_keys_is_log_T():
    for t in (1, 2, 7, 64):
        assert diagnostics.entropy(torch.full((t,), 1 / t)).item() == pytest.approx(math.log(t))
    assert diagnostics.entropy(torch.tensor([1.0, 0.0, 0.0])).item() == 0.0
    assert diagnostics.entropy(torch.tensor([0.5, 0.5, 0.0])).item() == pytest.approx(math.log(2))


def test_equal_scores_give_uniform_attention_over_the_visible_keys():
    q, k = torch.zeros(1, 1, 10, 4), torch.randn(1, 1, 10, 4)
    full = naive.probabilities(q, k, causal=False, scale=0.5)
    assert diagnostics.entropy(full).squeeze().tolist() == pytest.approx([math.log(10)] * 10)
    causal = diagnostics.entropy(naive.probabilities(q, k, causal=True, scale=0.5)).squeeze()
    assert causal.tolist() == pytest.approx([math.log(i + 1) for i in range(10)])
    by_hand = sum(math.log(i + 1) for i in range(10)) / 10
    assert diagnostics.uniform_entropy(10) == pytest.approx(by_hand)
    assert diagnostics.uniform_entropy(10, window=20) == pytest.approx(by_hand)
    windowed = diagnostics.entropy(naive.probabilities(q, k, causal=True, scale=0.5, window=3))
    by_hand = (math.log(1) + math.log(2) + 8 * math.log(3)) / 10  # query i sees min(i + 1, 3) keys
    assert windowed.mean().item() == pytest.approx(by_hand)
    assert diagnostics.uniform_entropy(10, window=3) == pytest.approx(by_hand)


@pytest.mark.parametrize("slopes", [None, torch.tensor([0.5, 0.25, 0.125])])
def test_probabilities_are_those_the_naive_backend_uses(slopes):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    probs = naive.probabilities(q, k, causal=True, scale=0.3, alibi_slopes=slopes)
    expected = naive.attend(q, k, v, causal=True, scale=0.3, alibi_slopes=slopes)
    assert torch.allclose(probs @ v, expected, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, 5))


def small_model(attention="sdpa", pos="learned", **options):
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=32, n_layer=2, n_head=4, n_embd=32, attention=attention, pos=pos,
                      **options)
    return GPT(cfg, vocab_size=20).eval()


@pytest.mark.parametrize("attention, pos", [("sdpa", "learned"), ("naive", "rope"),
                                            ("tiled", "alibi"), ("sdpa", "alibi")])
def test_capturing_changes_no_output_and_restores_the_backend(attention, pos):
    model = small_model(attention, pos)
    ids = torch.randint(20, (2, 16))
    before = [block.attn.attend for block in model.blocks]
    expected, _ = model(ids)
    with diagnostics.captured_attention(model) as captured:
        logits, _ = model(ids)
    assert torch.equal(logits, expected)
    assert [p.shape for p in captured] == [(2, 4, 16, 16)] * 2
    assert [block.attn.attend for block in model.blocks] == before


@pytest.mark.parametrize("attention", ["naive", "sdpa", "tiled"])
@pytest.mark.parametrize("options", [
    {"pos": "alibi"}, {"pos": "relative"}, {"pos": "rope", "softcap": 2.0},
    {"pos": "rope", "window": 5}, {"pos": "rope", "n_kv_head": 2}],
    ids=["alibi", "relative", "softcap", "window", "grouped"])
def test_the_captured_weights_are_those_the_backend_applied(attention, options):
    """The captured probabilities times the values give the backend's own output: every bias,
    cap, window and key/value head the backend saw is in them."""
    model = small_model(attention, **options)
    with torch.no_grad():
        for p in model.parameters():  # a relative table far from zero, scores that the cap bends
            p.normal_(std=1.0)
    applied = []
    for block in model.blocks:
        def recording(q, k, v, attend=block.attn.attend, **kwargs):
            out = attend(q, k, v, **kwargs)
            applied.append((v, out))
            return out
        block.attn.attend = recording
    with torch.no_grad(), diagnostics.captured_attention(model) as captured:
        model(torch.randint(20, (2, 16), generator=torch.Generator().manual_seed(3)))
    for probs, (v, out) in zip(captured, applied, strict=True):
        v = v.repeat_interleave(probs.size(1) // v.size(1), dim=1)
        torch.testing.assert_close(probs @ v, out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [{}, {"score": "additive"}, {"pos": "relative"}])
def test_a_bfloat16_models_attention_is_its_float32_copys_to_bfloat16s_precision(options):
    # The probabilities are recomputed in float32 from the bfloat16 model's own q and k (and its
    # additive score's weight): a float32 copy of the model gives them to bfloat16's precision.
    model = small_model("naive", **{"pos": "learned", **options})
    ids = list(range(1, 17))
    in_bf16 = diagnostics.attention_of(model.to(torch.bfloat16), ids)
    in_fp32 = diagnostics.attention_of(model.float(), ids)
    for got, want in zip(in_bf16, in_fp32):
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=0.05)


def test_attention_with_no_query_signal_scores_the_maximum():
    # layer 0 windowed to 5 keys, layer 1 full: each reaches its own maximum
    model = small_model(window=5, window_pattern="SL")
    for block in model.blocks:  # queries and keys all zero: every score equal
        torch.nn.init.zeros_(block.attn.qkv.weight)
    report = diagnostics.entropy_report(diagnostics.attention_of(model, list(range(20))), [5, 0])
    assert report["tokens"] == 20 and report["log_T"] == pytest.approx(math.log(20))
    windowed = (sum(math.log(i + 1) for i in range(5)) + 15 * math.log(5)) / 20
    full = sum(math.log(i + 1) for i in range(20)) / 20
    assert report["max_entropy"] == pytest.approx([windowed, full])
    for layer, top in zip(report["entropy"], report["max_entropy"]):
        assert layer == pytest.approx([top] * 4)


def test_at_initialisation_attention_is_nearly_uniform():
    model = small_model()
    report = diagnostics.entropy_report(diagnostics.attention_of(model, torch.randint(20, (32,)).tolist()),
                                        [0, 0])
    for layer, top in zip(report["entropy"], report["max_entropy"]):
        for head in layer:
            assert 0.98 * top < head <= top + 1e-6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diag")
    overrides = [x for o in [f"data.source={text_file(tmp)}", *TINY] for x in ("--set", o)]
    result = CliRunner().invoke(cli, ["train", *overrides, "--out", str(tmp / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def test_eval_reports_entropy_per_layer_and_head(run_dir):
    result = CliRunner().invoke(cli, ["eval", str(run_dir), "--attention", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["attention"]
    assert report["tokens"] == 32  # the first block_size tokens of the val split
    assert report["max_entropy"] == pytest.approx([math.lgamma(33) / 32] * 2)
    assert len(report["entropy"]) == 2 and all(len(heads) == 2 for heads in report["entropy"])
    assert all(0 <= e <= top + 1e-6 for heads, top in zip(report["entropy"], report["max_entropy"])
               for e in heads)
    text = CliRunner().invoke(cli, ["eval", str(run_dir), "--attention", "--text", "line 1: the"])
    assert "mean over 11 query positions" in text.stdout and "layer 1:" in text.stdout
    implied = CliRunner().invoke(cli, ["eval", str(run_dir), "--text", "line 1: the"])
    assert implied.stdout == text.stdout  # a --text is for the attention report: it implies it


def test_eval_refuses_a_text_longer_than_the_window(run_dir):
    result = CliRunner().invoke(cli, ["eval", str(run_dir), "--attention", "--text", "fox " * 9])
    assert result.exit_code == 2 and "--text is 36 tokens long and the model reads at most 32" in result.stderr


def test_attention_maps_are_png_heat_maps_of_the_weights(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    out = tmp_path / "maps"
    result = CliRunner().invoke(cli, ["eval", str(run_dir), "--text", "the lazy dog", "--json",
                                      "--attention-map", str(out)])
    assert result.exit_code == 0, result.output
    paths = json.loads(result.stdout)["attention"]["maps"]
    assert paths == [str(out / "attention_layer0.png"), str(out / "attention_layer1.png")]
    for path in paths:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(path).shape
        assert width > height > 100  # two heads side by side


def test_a_map_figure_shows_the_weights_of_each_head():
    pytest.importorskip("matplotlib")
    from attnlm.plots import attention_figure

    maps = diagnostics.attention_of(small_model(), list(range(6)))
    report = diagnostics.entropy_report(maps, [0, 0])
    fig = attention_figure(maps[1], report["entropy"][1], list("abcdef"), layer=1)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 4
    for head, image in enumerate(images):
        assert torch.allclose(torch.as_tensor(image.get_array()), maps[1][head])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list("abcdef")


def test_jensen_shannon_divergence_in_bits_by_hand():
    one, half = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    # mean (0.75, 0.25): KL(one) = log2(4/3), KL(half) = (log2(2/3) + log2(2)) / 2
    by_hand = (math.log2(4 / 3) + (math.log2(2 / 3) + 1) / 2) / 2
    assert diagnostics.js_divergence(one, half).item() == pytest.approx(by_hand)
    assert diagnostics.js_divergence(half, half).item() == pytest.approx(0.0, abs=1e-7)
    assert diagnostics.js_divergence(one, torch.tensor([0.0, 1.0])).item() == pytest.approx(1.0)


def test_identical_heads_are_similar_1_and_heads_on_disjoint_keys_0():
    # Three heads over 3 positions; query 0 sees key 0 alone and is left out. Heads 0 and 1
    # look at key 0 from every query, head 2 at the query's own position (1, then 2).
    probs = torch.zeros(3, 3, 3)
    probs[:2, :, 0] = 1.0
    probs[2, [0, 1, 2], [0, 1, 2]] = 1.0
    pairs = diagnostics.head_similarity(probs)
    assert torch.allclose(pairs, torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1]]), atol=1e-6)
    report = diagnostics.similarity_report([probs, probs[:2]])
    assert report["head_similarity"] == pytest.approx([1 / 3, 1.0])  # mean over the pairs


def test_similarity_of_a_half_shared_head_by_hand():
    # Query 1: head 0 all on key 0, head 1 half on each key: 1 - 0.311 bits (as above).
    probs = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.5, 0.5]]])
    by_hand = 1 - (math.log2(4 / 3) + (math.log2(2 / 3) + 1) / 2) / 2
    assert diagnostics.similarity_report([probs])["head_similarity"] == pytest.approx([by_hand])


def test_similarity_stays_finite_for_weights_at_the_smallest_float32():
    # Sharp attention leaves weights of 1e-45 (float32's smallest): half of one rounds to 0.
    tiny = torch.tensor(1e-45)
    assert tiny > 0 and tiny / 2 == 0
    probs = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, tiny]]])
    assert diagnostics.similarity_report([probs])["head_similarity"] == pytest.approx([1.0])


def test_similarity_is_none_without_a_pair_or_a_query_to_compare():
    one_head = torch.softmax(torch.randn(1, 4, 4), -1)
    one_token = torch.ones(2, 1, 1)
    report = diagnostics.similarity_report([one_head])
    assert report["head_similarity"] == [None]
    report = diagnostics.similarity_report([one_token])
    assert report["head_similarity"] == [None]
    assert report["head_similarity_pairs"] == [[[None, None], [None, None]]]


def test_eval_reports_head_similarity_with_the_attention(run_dir):
    result = CliRunner().invoke(cli, ["eval", str(run_dir), "--text", "line 1: the", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    from attnlm import api

    run = api.load_run(run_dir)
    maps = diagnostics.attention_of(run.model, run.tokenizer.encode("line 1: the"))
    expected = [diagnostics.head_similarity(probs)[0, 1].item() for probs in maps]  # 2 heads
    assert found["attention"]["head_similarity"] == pytest.approx(expected)
    assert found["head_similarity"] == pytest.approx(sum(expected) / 2)
    assert all(0 <= s <= 1 for s in expected)
    outputs = diagnostics.head_output_similarity(run.model, run.tokenizer.encode("line 1: the"))
    assert found["attention"]["head_output_similarity"] == pytest.approx(outputs)
    assert found["head_output_similarity"] == pytest.approx(sum(outputs) / 2)
    text = CliRunner().invoke(cli, ["eval", str(run_dir), "--text", "line 1: the"])
    assert "head similarity" in text.stdout
    assert f"  layer 1: {expected[1]:.3f}" in text.stdout.split("head similarity")[1]


def test_head_output_similarity_is_the_mean_cosine_over_pairs_of_heads():
    model = small_model()
    ids = torch.arange(10).unsqueeze(0)
    x = model.tok_emb(ids) + model.pos_emb(0, 10)
    expected = []
    with torch.no_grad():
        for block in model.blocks:
            _, heads = block.attn(block.norm1(x))  # (1, 4, 10, 8)
            pairs = [torch.nn.functional.cosine_similarity(heads[:, h], heads[:, g], dim=-1).mean()
                     for h in range(4) for g in range(h + 1, 4)]
            expected.append(torch.stack(pairs).mean().item())
            x = block(x)
    assert diagnostics.head_output_similarity(model, list(range(10))) == pytest.approx(expected,
                                                                                        rel=1e-4)
