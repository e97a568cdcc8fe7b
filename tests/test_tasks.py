import json
import re

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from attnlm import tasks
from attnlm.run import load_model
from attnlm.cli import cli
from attnlm.config import ModelConfig, build_config, load_config
from attnlm.batches import BatchSampler, Split, window_starts
from attnlm.data import prepare_training, resolve_source
from attnlm.errors import InputError
from attnlm.evaluate import split_loss
from attnlm.tokenizer import CharTokenizer
from attnlm.train import train


def lines(spec):
    return tasks.parse(spec).text().splitlines()


def test_defaults_and_options():
    assert tasks.parse("synthetic:copy") == tasks.Task("copy", 16, 8, 20000, 0)
    assert tasks.parse("synthetic:associative_recall") == tasks.Task("associative_recall", 8, 16, 20000, 0)
    assert tasks.parse("synthetic:reverse,vocab=3,length=5,n=7,seed=2") == tasks.Task("reverse", 5, 3, 7, 2)


def test_text_is_a_function_of_the_spec():
    assert lines("synthetic:copy,n=50") == lines("synthetic:copy,n=50")
    assert lines("synthetic:copy,n=50") != lines("synthetic:copy,n=50,seed=1")
    assert lines("synthetic:copy,n=50")[:20] == lines("synthetic:copy,n=20")


@pytest.mark.parametrize("name, expected", [("copy", lambda s: s), ("reverse", lambda s: s[::-1])])
def test_copy_and_reverse_lines(name, expected):
    rows = lines(f"synthetic:{name},length=6,vocab=3,n=200")
    assert len(rows) == 200
    for row in rows:
        context, answer = row.split("|")
        assert len(context) == 6 and set(context) <= set("abc")
        assert answer == expected(context)


def test_recall_lines_ask_every_key_for_its_value():
    for row in lines("synthetic:associative_recall,length=5,vocab=7,n=200"):
        context, queries = row.split("|")
        pairs = dict(zip(context[::2], context[1::2]))
        assert len(pairs) == 5 and set(pairs) <= set("abcdefg") and set(pairs.values()) <= set("ABCDEFG")
        assert sorted(queries[::2]) == sorted(pairs)
        assert all(pairs[k] == v for k, v in zip(queries[::2], queries[1::2]))


def pairs(context):
    return frozenset(zip(context[::2], context[1::2]))


def test_heldout_examples_are_unseen_distinct_and_reproducible():
    # Unseen as sets of pairs: a training line with the same pairs in another order would teach
    # the held-out answer.
    task = tasks.parse("synthetic:associative_recall,length=2,vocab=4,n=40")
    held = task.heldout(20)
    assert held == task.heldout(20)
    contexts = [prompt.split("|")[0] for prompt, _ in held]
    assert len({pairs(c) for c in contexts}) == 20
    assert not {pairs(c) for c in contexts} & {pairs(row.split("|")[0])
                                                for row in task.text().splitlines()}
    for prompt, answer in held:
        context, query = prompt.split("|")
        assert dict(zip(context[::2], context[1::2]))[query] == answer


def test_heldout_examples_of_another_variant_leave_out_the_lines_a_model_trained_on():
    trained = "synthetic:copy,length=4,vocab=4,n=150"
    other = tasks.parse("synthetic:copy,length=4,vocab=4,n=150,seed=1")
    seen = {row.split("|")[0] for row in tasks.parse(trained).text().splitlines()}
    assert {p.split("|")[0] for p, _ in other.heldout(50)} & seen  # the leak, were it not told
    held = other.heldout(50, tasks.parse(trained))
    assert not {p.split("|")[0] for p, _ in held} & seen


def test_a_task_too_small_to_hold_out_says_so():
    with pytest.raises(InputError, match="too few contexts"):
        tasks.parse("synthetic:copy,length=2,vocab=2,n=100").heldout(10)


def test_chance_is_uniform_guessing():
    assert tasks.parse("synthetic:copy,length=3,vocab=4").chance() == pytest.approx(1 / 64)
    assert tasks.parse("synthetic:associative_recall,vocab=10").chance() == pytest.approx(0.1)


@pytest.mark.parametrize("spec, message", [
    ("synthetic:cpy", "unknown task 'cpy' (did you mean 'copy'?)"),
    ("synthetic:copy,lenght=4", "unknown option 'lenght' (did you mean 'length'?)"),
    ("synthetic:copy,length=four", "length must be an integer"),
    ("synthetic:copy,vocab=27", "vocab=27 must be in [2, 26]"),
    ("synthetic:reverse,length=0", "length=0 must be positive"),
    ("synthetic:associative_recall,length=9,vocab=8", "vocab must be at least"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(InputError) as err:
        tasks.parse(spec)
    assert message in str(err.value)


def test_a_synthetic_spec_is_a_data_source():
    corpus = resolve_source("synthetic:reverse,n=10")  # its commas and '?'-free form is no glob
    assert b"".join(corpus.parts).decode() == tasks.parse("synthetic:reverse,n=10").text()
    with pytest.raises(InputError, match="unknown task"):
        resolve_source("synthetic:nope")


def test_training_windows_start_where_examples_do(tmp_path):
    spec = "synthetic:copy,length=5,vocab=4,n=300"
    cfg = build_config(overrides=[f"data.source={spec}", "model.block_size=20",
                                  f"data.cache_dir={tmp_path}"])
    tokenizer, splits = prepare_training(cfg)
    example = re.compile(r"\n[abcd]{5}\|[abcd]{5}\n")  # as an exact-match prompt starts
    for name, split in splits.items():
        sampler = BatchSampler(split, 20, 64, seed=0)
        for _ in range(5):
            x, y = sampler.next()
            for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
                assert example.match(tokenizer.decode(row)), (name, tokenizer.decode(row))
    lines = BatchSampler(Split(splits["train"].tokens, 0), 20, 512, seed=0).next()[0][:, 0]
    assert (lines == tokenizer.encode("|")[0]).any()  # text sources: windows start anywhere


def test_windows_start_at_the_newlines_a_whole_window_follows():
    tokenizer = CharTokenizer("\nab")  # newline: 0
    tokens = torch.tensor(tokenizer.encode("\naaaaa\n\nbb"))
    split = Split(tokens, len(tokens), tasks.example_starts(tokens, tokenizer))
    assert split.starts.tolist() == [0, 6, 7]
    assert window_starts(split, block_size=3).tolist() == [0, 6]  # 7 + 4 tokens overrun
    assert window_starts(split, block_size=9).tolist() == [0]
    with pytest.raises(InputError, match="no example followed by 11 tokens"):
        window_starts(split, block_size=10)


def test_a_task_that_cannot_fit_the_window_is_refused_before_training(tmp_path):
    result = CliRunner().invoke(cli, [
        "train", "--out", str(tmp_path / "run"), "--set", "data.source=synthetic:copy,length=40",
        "--set", "model.block_size=64", "--set", "train.max_iters=1"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: data.source='synthetic:copy,length=40': an example "
                                     "needs 81 tokens of context; model.block_size=64 is too small")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # read before the last answer symbol: copy \n, 40 symbols, |, 39; recall \n, 8 pairs, |, a key
    for spec, needed in [("synthetic:copy,length=40", 81), ("synthetic:associative_recall", 19)]:
        tasks.check_fits(spec, needed)
        with pytest.raises(InputError, match=f"needs {needed} tokens"):
            tasks.check_fits(spec, needed - 1)


def test_eval_reports_the_val_loss_training_reported(tmp_path):
    """One val loss for a run: eval over the whole split (a window at every example) agrees with
    training's sampled estimate; windows starting mid-line (the old eval) give another number."""
    cfg = build_config(overrides=[
        f"data.source={TINY_COPY}", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=32", "train.batch_size=16", "train.max_iters=100", "train.lr=5e-3",
        "train.warmup_iters=10", "train.eval_interval=100", "train.eval_iters=20",
        "train.threads=1"])
    trained = train(cfg, tmp_path / "run", quiet=True)["val_loss"]
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "run"), "--examples", "10", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loss"] == pytest.approx(trained, abs=0.05)
    model, tokenizer, _, _ = load_model(tmp_path / "run", torch.device("cpu"))
    val = prepare_training(cfg, tokenizer)[1]["val"]
    anywhere = split_loss(model, Split(val.tokens, val.n_bytes), 32, 16, "cpu")
    assert anywhere > trained + 0.5  # what this test tells apart


class Copier(nn.Module):
    """A stand-in model that copies the token `length` places back, replacing `flaw` by `to`."""

    def __init__(self, tokenizer, length, flaw=None, to=None):
        super().__init__()
        self.cfg = ModelConfig(block_size=64)
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the scorer a device
        self.vocab, self.length = tokenizer.vocab_size, length
        self.swap = tokenizer.encode(flaw + to) if flaw else None

    def new_cache(self, *_):
        return None  # no KV cache: generation re-reads the whole sequence every step

    def forward(self, ids, cache=None, pos=None, last_only=False):
        source = torch.roll(ids, self.length, dims=1)
        if self.swap:
            source = source.masked_fill(source == self.swap[0], self.swap[1])
        return nn.functional.one_hot(source, self.vocab).float(), None


def test_exact_match_counts_whole_answers():
    task = tasks.parse("synthetic:copy,length=5,vocab=4,n=100")
    tokenizer = CharTokenizer(task.text())
    held = task.heldout(200)
    assert tasks.exact_match(Copier(tokenizer, 5), tokenizer, held, batch_size=64) == 1.0
    flawed = Copier(tokenizer, 5, flaw="a", to="b")
    without_a = sum("a" not in answer for _, answer in held) / len(held)
    assert 0 < without_a < 1
    assert tasks.exact_match(flawed, tokenizer, held, batch_size=64) == pytest.approx(without_a)


def test_examples_longer_than_the_window_are_refused():
    task = tasks.parse("synthetic:copy,length=40,vocab=4,n=10")
    tokenizer = CharTokenizer(task.text())
    with pytest.raises(InputError, match="need 81 tokens of context"):
        tasks.exact_match(Copier(tokenizer, 40), tokenizer, task.heldout(2))


def test_exact_match_needs_prompts_of_one_length():
    class Merging:  # a subword-like tokenizer: "ab" is one token
        def encode(self, text):
            return [0] * len(text.replace("ab", "X"))

    model = Copier(CharTokenizer("ab|\n"), 2)
    with pytest.raises(InputError, match="as many tokens long"):
        tasks.exact_match(model, Merging(), [("ab|", "ab"), ("ba|", "ba")])


TINY_COPY = "synthetic:copy,length=4,vocab=6,n=1000"


def test_a_tiny_model_learns_to_copy_far_above_chance(tmp_path):
    # Wide enough that the copying head forms early: on seeds 0-4 and 1337, 1 and 2 threads,
    # exact match reached 0.9 by step 50-60 and stayed 1.0 to 200 (Intel Xeon with AMX; 1.0 at
    # step 200 for each of them on an AMD EPYC too). A narrower model (n_embd=32) sat at 0% for
    # 600 steps on some CPUs and seeds, then jumped.
    cfg = build_config(overrides=[
        f"data.source={TINY_COPY}", "model.n_layer=2", "model.n_head=4", "model.n_embd=128",
        "model.block_size=32", "train.batch_size=16", "train.max_iters=200", "train.lr=1e-3",
        "train.warmup_iters=50", "train.eval_interval=200", "train.eval_iters=2",
        "train.threads=1"])
    train(cfg, tmp_path / "run", quiet=True)
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "run"), "--examples", "200", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["examples"] == 200 and report["chance"] == pytest.approx(6 ** -4)
    assert report["exact_match"] >= 0.9  # chance is 0.08%


@pytest.mark.parametrize("recipe", ["copy", "associative_recall"])
def test_recipes_load_and_name_their_task(recipe):
    cfg = load_config(recipe)
    assert tasks.is_synthetic(cfg.data.source) and tasks.parse(cfg.data.source)


# The copy recipe is at 100% from step 100 of its 300 on every seed measured. The recall recipe
# is not tested so: its circuit forms after a plateau whose length depends on the seed and the
# CPU's float kernels (six seeds of eight within its steps; README), a jump no test can await.
@pytest.mark.slow
def test_the_copy_recipe_reaches_99_percent(tmp_path):
    train(load_config("copy"), tmp_path / "run", quiet=True)
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "run"), "--examples", "1000", "--json"])
    assert json.loads(result.stdout)["exact_match"] >= 0.99
