"""KV-cached generation against uncached decoding (the reference), for every attention backend,
and the `generate` command."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from attnlm import decode_products, run as run_mod, tasks
from attnlm.attention import BACKENDS
from attnlm.cli import cli
from attnlm.config import ModelConfig
from attnlm.model import GPT
from attnlm.positional import SCHEMES
from attnlm.sampling import Controls, complete, generate, without_onednn
from attnlm.train import train
from tests.helpers import spread, text_file, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 16
TEXT = "".join(f"line {i}: the quick brown fox — naïve café, 1€ — jumps.\n" for i in range(40))


def backend_params():
    """Every registered backend; those that need CUDA are skipped without it."""
    return [pytest.param(name, marks=pytest.mark.skipif(
        backend.cuda_only and not torch.cuda.is_available(), reason="needs CUDA"))
        for name, backend in BACKENDS.items()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate")
    cfg = tiny_config(text_file(tmp, TEXT), f"model.block_size={BLOCK}", "tokenizer.kind=bytes",
                      "train.max_iters=300", "train.lr=3e-3", f"data.cache_dir={tmp / 'cache'}")
    train(cfg, tmp / "run", quiet=True)
    return tmp / "run"


def load(run_dir, backend):
    """The trained model with its attention computed by `backend` (on CUDA if it needs it)."""
    _, tokenizer, cfg, ckpt = run_mod.load_model(run_dir)
    model = GPT(dataclasses.replace(cfg.model, attention=backend), tokenizer.vocab_size)
    model.load_state_dict(ckpt["model"])
    return model.to("cuda" if BACKENDS[backend].cuda_only else "cpu").eval(), tokenizer


def tokens(model, prompt, n, controls, seed=0, use_cache=True, rows=1):
    """rows samples of prompt (one list of ids, or a list of them: one per batch row)."""
    device = next(model.parameters()).device
    prompt = torch.tensor(prompt if isinstance(prompt[0], list) else [prompt], device=device)
    gen = torch.Generator(device).manual_seed(seed)
    steps = list(generate(model, prompt, n, controls, gen, use_cache, num_samples=rows))
    return torch.stack(steps, dim=1).tolist()


SHORT = list(b"line 3")
LONG = list("line 7: the quick brown fox — naïve".encode())  # longer than the window
CONTROLS = [Controls(temperature=0), Controls(temperature=0, repetition_penalty=1.3),
            Controls(temperature=1.0), Controls(0.8, 20, 0.9, 0.05, 1.2)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("controls", CONTROLS, ids=["greedy", "greedy-penalty", "sample", "all"])
@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short", "long"])
def test_cached_and_uncached_decoding_give_the_same_tokens(run_dir, backend, controls, prompt):
    model, _ = load(run_dir, backend)
    n = 3 * BLOCK  # crosses the full window several times
    cached = tokens(model, prompt, n, controls, seed=7, rows=2)
    assert cached == tokens(model, prompt, n, controls, seed=7, rows=2, use_cache=False)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("pos", list(SCHEMES))
def test_cached_and_uncached_agree_for_every_positional_scheme(backend, pos):
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, pos=pos, attention=backend)
    model = spread(GPT(cfg, 256)).to("cuda" if BACKENDS[backend].cuda_only else "cpu").eval()
    for controls in (Controls(temperature=0), Controls(temperature=1.0)):
        cached = tokens(model, SHORT[:3], 2 * BLOCK, controls, seed=3, rows=2)
        assert cached == tokens(model, SHORT[:3], 2 * BLOCK, controls, seed=3, rows=2,
                                use_cache=False)


@pytest.mark.parametrize("split", [True, False], ids=["split", "linear"])
def test_cached_steps_give_the_uncached_tokens_in_either_form_of_their_products(
        run_dir, monkeypatch, split):
    """Whichever form of the weight products this machine picks for a step (see
    decode_products), the tokens are those of the uncached path; each layer has its own forward
    back after generating."""
    monkeypatch.setattr("attnlm.sampling.split_is_faster", lambda layers, rows: split)
    calls, split_linear = [], decode_products.split_linear
    monkeypatch.setattr(decode_products, "split_linear",
                        lambda layer, x: calls.append(x.shape) or split_linear(layer, x))
    model, _ = load(run_dir, "sdpa")
    for controls in CONTROLS:
        cached = tokens(model, LONG, 3 * BLOCK, controls, seed=7, rows=2)
        assert cached == tokens(model, LONG, 3 * BLOCK, controls, seed=7, rows=2, use_cache=False)
    assert bool(calls) == split and all(shape[:2] == (2, 1) for shape in calls)
    assert not any("forward" in vars(m) for m in model.modules())


def test_rows_of_a_batch_are_independent_samples_and_a_seed_repeats_them(run_dir):
    model, _ = load(run_dir, "sdpa")
    hot = Controls(temperature=2.0)
    rows = tokens(model, SHORT, 30, hot, seed=1, rows=2)
    assert rows[0] != rows[1] and rows == tokens(model, SHORT, 30, hot, seed=1, rows=2)
    assert rows != tokens(model, SHORT, 30, hot, seed=2, rows=2)


@pytest.mark.parametrize("backend", backend_params())
def test_a_cached_step_gives_the_logits_of_a_full_forward(run_dir, backend):
    model, _ = load(run_dir, backend)
    ids = torch.tensor([list(b"the quick brown fox")[:BLOCK]] * 2, device=model.head.weight.device)
    ids[1] = ids[1].flip(0)
    cache = model.new_cache(2, BLOCK)
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
        for pos in range(5, BLOCK):
            step, _ = model(ids[:, pos:pos + 1], cache=cache)
            full, _ = model(ids[:, :pos + 1])
            torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=0)


def reference_greedy(model, prompt, n, penalty=1.0):
    """Greedy decoding written out plainly: the documented window rule, a full forward a step,
    and the repetition penalty on every token of the sequence so far."""
    seq, start = list(prompt[-BLOCK:]), 0
    with torch.no_grad():
        for _ in range(n):
            if len(seq) - start > BLOCK:
                start = len(seq) - BLOCK // 2
            logits, _ = model(torch.tensor([seq[start:]]))
            logits = logits[0, -1]
            for t in set(seq):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            seq.append(logits.argmax().item())
    return seq[-n:]


@pytest.mark.parametrize("penalty", [1.0, 1.5])
@pytest.mark.parametrize("prompt", [SHORT, LONG], ids=["short", "long"])
def test_the_window_policy_and_repetition_penalty_against_a_plain_loop(run_dir, prompt, penalty):
    model, _ = load(run_dir, "naive")
    n = 3 * BLOCK
    controls = Controls(temperature=0, repetition_penalty=penalty)
    assert tokens(model, prompt, n, controls) == [reference_greedy(model, prompt, n, penalty)]


def test_the_cache_is_allocated_once_and_each_step_is_one_forward_for_all_rows(run_dir):
    model, _ = load(run_dir, "sdpa")
    caches, calls = [], []
    new_cache = model.new_cache
    model.new_cache = lambda *a: caches.append(new_cache(*a)) or caches[-1]
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    n = 2 * BLOCK
    tokens(model, SHORT, n, Controls(), rows=3)
    assert len(caches) == 1 and len(calls) == n
    prefills = [shape for shape in calls if shape[1] > 1]
    # the prompt, read once for the 3 samples; then the window is full after 16 - 6 new tokens
    # and every 8 after: 3 restarts
    assert prefills == [(1, len(SHORT))] + [(3, BLOCK // 2)] * 3
    assert all(shape[0] == 3 for shape in calls[1:])


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_samples_of_a_batch_of_prompts_follow_each_prompt(use_cache):
    """Row r + i·B is sample i of prompt r: with greedy decoding, prompt r's text alone."""
    torch.manual_seed(0)  # untrained: its continuations of two prompts differ, unlike a model
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK), 256).eval()
    prompts = [list(b"line 3"), list(b"fox 12")]  # that has learned to finish both alike
    greedy = Controls(temperature=0)
    rows = tokens(model, prompts, 2 * BLOCK, greedy, rows=3, use_cache=use_cache)
    alone = [tokens(model, p, 2 * BLOCK, greedy)[0] for p in prompts]
    assert rows == alone * 3 and alone[0] != alone[1]


def test_decoding_computes_the_logits_of_the_last_position_only(run_dir):
    model, _ = load(run_dir, "sdpa")
    ids = torch.tensor([list(b"the quick brown")])
    last, _ = model(ids, last_only=True)
    torch.testing.assert_close(last, model(ids)[0][:, -1:])
    heads = []
    model.head.register_forward_hook(lambda module, args, out: heads.append(args[0].size(1)))
    for use_cache in (True, False):
        tokens(model, LONG, 2 * BLOCK, Controls(), use_cache=use_cache)
    assert heads == [1] * 4 * BLOCK


@pytest.mark.parametrize("backend", backend_params())
def test_every_decode_step_runs_the_chosen_backend(run_dir, backend):
    """A cached step's one query goes through the backend a user chose, in every layer."""
    model, _ = load(run_dir, backend)
    queries = []
    for block in model.blocks:
        chosen = block.attn.attend
        block.attn.attend = lambda q, *a, chosen=chosen, **kw: queries.append(q.size(2)) or chosen(
            q, *a, **kw)
    tokens(model, SHORT, 8, Controls())
    assert queries == [len(SHORT)] * len(model.blocks) + [1] * 7 * len(model.blocks)


def test_one_position_steps_run_without_onednn_and_a_prompt_with_it(run_dir):
    """A decode step takes torch's own kernels (oneDNN's set-up per call outweighs its work); a
    prompt keeps oneDNN (its bfloat16 products are the fast ones); the setting comes back after,
    also when a step fails."""
    model, _ = load(run_dir, "sdpa")
    seen = []
    model.register_forward_hook(
        lambda module, args, out: seen.append((args[0].size(1), torch.backends.mkldnn.enabled)))
    tokens(model, SHORT, 4, Controls())
    assert seen == [(len(SHORT), True)] + [(1, False)] * 3
    assert torch.backends.mkldnn.enabled
    with pytest.raises(KeyboardInterrupt), without_onednn():
        raise KeyboardInterrupt
    assert torch.backends.mkldnn.enabled


def test_exact_match_decodes_through_the_cached_generation_loop(run_dir):
    """Every prompt read once, then one token a step (not the prefix again for each token)."""
    model, tokenizer = load(run_dir, "sdpa")
    greedy = [tokenizer.decode(reference_greedy(model, tokenizer.encode(tasks.START + p), 4))
              for p in ("line 1", "line 2")]  # the plain loop's answers
    examples = [("line 1", greedy[0]), ("line 2", greedy[1]), ("line 3", "xxxx")]
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    assert tasks.exact_match(model, tokenizer, examples) == pytest.approx(2 / 3)
    prompt = len(tokenizer.encode(tasks.START + "line 1"))
    assert calls == [(3, prompt)] + [(3, 1)] * 3


@pytest.mark.slow  # compiling takes about a minute on 2 busy cores
def test_compiled_steps_give_the_plain_paths_tokens(run_dir, tmp_path, monkeypatch):
    """torch.compile'd decoding (--compile) against plain torch: greedy and sampled, across
    window restarts, two samples of one prompt."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, tokenizer = load(run_dir, "sdpa")
    ids = tokenizer.encode("line 5")
    for controls in (Controls(temperature=0), Controls(temperature=1.0, top_k=20)):
        plain = complete(model, tokenizer, ids, 3 * BLOCK, controls, num_samples=2, seed=4)
        fast = complete(model, tokenizer, ids, 3 * BLOCK, controls, num_samples=2, seed=4,
                        compile=True)
        assert fast == plain and fast[0].tokens == 3 * BLOCK
    assert any((tmp_path / "inductor").iterdir())  # it did compile


def test_cli_offers_compiling_in_help():
    help_text = run("generate", "--help").output
    assert "--compile" in help_text and "torch.compile" in help_text


def test_end_of_text_token_ends_a_sample_unshown(run_dir):
    model, tokenizer = load(run_dir, "sdpa")
    ids, greedy = tokenizer.encode("line 1"), Controls(temperature=0)
    plain = complete(model, tokenizer, ids, 12, greedy)[0]
    generated = tokens(model, ids, 12, greedy)[0]
    first = next(i for i, t in enumerate(generated) if i and t < 128)  # an ASCII byte, not the 1st
    tokenizer.eos_id = generated[first]
    ended = complete(model, tokenizer, ids, 12, greedy)[0]
    assert ended.finish == "eos" and ended.tokens == generated.index(tokenizer.eos_id) + 1
    assert ended.text == tokenizer.decode(generated[:ended.tokens - 1])
    assert plain.text.startswith(ended.text) and plain.finish == "length"


# Grouped-query and sliding-window layers: the cache holds n_kv_head heads, a windowed layer a
# ring of `window` positions. WINDOWED: every backend that runs on the CPU, where these models are.

WINDOWED = [name for name, backend in BACKENDS.items() if not backend.cuda_only]
WINDOW = 5
LAYOUTS = {"windowed": ("", 4), "SSSL": ("SSSL", 4), "LS": ("LS", 2)}  # pattern, layers


def variant(pos, layout, n_kv_head, backend="naive"):
    """An untrained 4-head model, spread (see helpers.spread)."""
    pattern, layers = LAYOUTS[layout]
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=BLOCK, n_layer=layers, n_head=4, n_kv_head=n_kv_head, n_embd=32,
                      pos=pos, window=WINDOW, window_pattern=pattern, attention=backend)
    return spread(GPT(cfg, 256)).eval()


def full_forward_greedy(model, prompt, generated):
    """Whether greedy decoding of `prompt` gives `generated`, by one forward pass over the whole
    text: the argmax at each position must be the next token."""
    text = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits, _ = model(text)
    return logits[0, len(prompt) - 1:-1].argmax(-1).tolist() == generated


@pytest.mark.parametrize("backend", WINDOWED)
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("pos", ["rope", "alibi"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_and_windowed_layers_decode_as_without_the_cache(backend, n_kv_head, pos, layout):
    """A prompt longer than the window; all layers windowed, so generation goes past block_size
    (against a forward pass over the whole text), or some full (against the plain loop with its
    window restarts)."""
    model = variant(pos, layout, n_kv_head, backend)
    n = 3 * BLOCK
    greedy = Controls(temperature=0)
    cached = tokens(model, LONG[:12], n, greedy)[0]
    assert cached == tokens(model, LONG[:12], n, greedy, use_cache=False)[0]
    if layout == "windowed":
        assert full_forward_greedy(model, LONG[:12], cached)
    else:
        assert cached == reference_greedy(model, LONG[:12], n)


@pytest.mark.parametrize("pos", ["rope", "alibi", "sinusoidal", "relative", "none"])
def test_an_all_windowed_model_generates_past_block_size_as_a_whole_forward_pass_does(pos):
    model = variant(pos, "windowed", 2)
    for use_cache in (True, False):
        generated = tokens(model, SHORT, 5 * BLOCK, Controls(temperature=0), use_cache=use_cache)[0]
        assert full_forward_greedy(model, SHORT, generated)


def test_learned_positions_stop_at_block_size_even_when_every_layer_is_windowed():
    model = variant("learned", "windowed", 2)
    n = 3 * BLOCK
    assert tokens(model, SHORT, n, Controls(temperature=0))[0] == reference_greedy(model, SHORT, n)


def test_an_all_windowed_model_reads_each_token_once_into_a_cache_of_fixed_size():
    """Bytes by hand: 4 layers, keys and values, 3 samples, 2 key/value heads of 8 dimensions,
    float32, 2·window slots a layer, however many tokens are generated."""
    model = variant("rope", "windowed", 2)
    for n in (BLOCK, 10 * BLOCK):
        caches, calls = [], []
        new_cache = model.new_cache
        model.new_cache = lambda *a: caches.append(new_cache(*a)) or caches[-1]
        hook = model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
        tokens(model, SHORT, n, Controls(), rows=3)
        hook.remove()
        del model.new_cache
        assert calls == [(1, len(SHORT))] + [(3, 1)] * (n - 1)  # no re-reading, ever
        assert caches[0].nbytes == 4 * 2 * 3 * 2 * 8 * 4 * 2 * WINDOW


def test_the_cache_shrinks_by_the_group_factor():
    sizes = {h: variant("rope", "SSSL", h).new_cache(1, BLOCK).nbytes for h in (4, 2, 1)}
    assert sizes[4] == 2 * sizes[2] == 4 * sizes[1]


# The command line.

def run(*args):
    args = [str(a) for a in args]
    if args[0] == "generate":
        args[2:2] = ["--threads", "1"]  # as in one_thread; a later --threads wins
    return CliRunner().invoke(cli, args)


def test_cli_streams_the_same_text_with_and_without_the_cache(run_dir, monkeypatch):
    lengths = []  # positions each forward pass reads
    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, idx, *a, **k: lengths.append(idx.size(1))
                        or forward(self, idx, *a, **k))
    for args in (["--temperature", 0], ["--seed", 5, "--top-p", 0.9, "--repetition-penalty", 1.2]):
        lengths.clear()
        cached = run("generate", run_dir, "--prompt", "line 2", "--max-new-tokens", 40, *args)
        # One position a step, but the prompt and each restart of the full 16-token window.
        assert lengths.count(1) >= 30
        lengths.clear()
        uncached = run("generate", run_dir, "--prompt", "line 2", "--max-new-tokens", 40, *args,
                       "--no-cache")
        assert min(lengths) > 1  # every step re-reads its window
        assert cached.exit_code == 0, cached.output
        assert cached.stdout == uncached.stdout and cached.stdout.startswith("line 2")


def test_cli_json_reports_text_token_count_and_speed(run_dir):
    result = run("generate", run_dir, "--prompt", "line", "--max-new-tokens", 25, "--json",
                 "--num-samples", 2, "--seed", 1)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [s["tokens"] for s in report["samples"]] == [25, 25] and report["tokens"] == 50
    assert report["tokens_per_s"] > 0 and report["cache"] is True
    streamed = run("generate", run_dir, "--prompt", "line", "--max-new-tokens", 25,
                   "--num-samples", 2, "--seed", 1)
    texts = [s["text"] for s in report["samples"]]
    assert streamed.stdout == f"line{texts[0]}\n---\nline{texts[1]}\n"


def test_cli_stops_before_a_stop_string_that_spans_tokens(run_dir):
    args = ["generate", run_dir, "--prompt", "line 4", "--max-new-tokens", 40, "--temperature", 0]
    full = json.loads(run(*args, "--json").stdout)["samples"][0]["text"]
    stop = full[10:13]  # three characters: at least three tokens
    cut = full.index(stop)
    result = json.loads(run(*args, "--json", "--stop", stop).stdout)["samples"][0]
    assert result["text"] == full[:cut] and result["finish"] == "stop"
    assert run(*args, "--stop", stop).stdout == "line 4" + full[:cut] + "\n"


def test_cli_reads_escapes_in_stop_strings(run_dir):
    args = ["generate", run_dir, "--prompt", "line 4", "--max-new-tokens", 300, "--temperature", 1]
    full = json.loads(run(*args, "--json").stdout)["samples"][0]["text"]
    assert "\n" in full
    result = json.loads(run(*args, "--json", "--stop", "\\n").stdout)["samples"][0]
    assert result["text"] == full[:full.index("\n")]


def test_cli_keeps_the_tail_of_a_long_prompt_with_a_warning(run_dir):
    long = "line 8: the quick brown fox jumps"
    result = run("generate", run_dir, "--prompt", long, "--max-new-tokens", 10, "--temperature", 0)
    tail = run("generate", run_dir, "--prompt", long[-BLOCK:], "--max-new-tokens", 10,
               "--temperature", 0)
    assert result.exit_code == 0 and f"keeping its last {BLOCK}" in result.stderr
    assert result.stdout.removeprefix(long) == tail.stdout.removeprefix(long[-BLOCK:])


def test_cli_empty_prompt_starts_from_a_newline(run_dir):
    empty = run("generate", run_dir, "--prompt", "", "--max-new-tokens", 10, "--temperature", 0)
    newline = run("generate", run_dir, "--prompt", "\n", "--max-new-tokens", 10, "--temperature", 0)
    assert empty.exit_code == 0 and "\n" + empty.stdout == newline.stdout


@pytest.mark.parametrize("args, message", [
    (["--top-p", 1.5], "--top-p 1.5 must be in [0.0001, 1]"),
    (["--temperature", -1], "--temperature -1.0 must be 0 (greedy)"),
    (["--min-p", 2], "--min-p 2.0"),
    (["--repetition-penalty", 0], "--repetition-penalty 0.0"),
    (["--top-k", -3], "--top-k -3"),
    (["--max-new-tokens", -1], "--max-new-tokens -1"),
    (["--num-samples", 0], "--num-samples 0"),
    (["--threads", -1], "--threads -1"),
    (["--prompt", "x", "--prompt-file", "p.txt"], "not both"),
])
def test_cli_rejects_bad_sampling_values_in_one_line(run_dir, args, message):
    result = run("generate", run_dir, *args)
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
