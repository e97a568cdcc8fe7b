"""Hugging Face export and import, checked against transformers itself: exported directories are
loaded in a fresh process that imports transformers and not attnlm; an imported GPT-2 is
compared with the transformers model it came from."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from pydoc_data.topics import topics

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from safetensors.torch import load_file  # noqa: E402

from attnlm import run as run_mod, tokenizer as tok  # noqa: E402
from attnlm.cli import cli  # noqa: E402
from attnlm.config import TokenizerConfig, build_config, to_dict  # noqa: E402
from attnlm.model import GPT  # noqa: E402
from attnlm.sampling import Controls, generate  # noqa: E402
from tests.helpers import text_file  # noqa: E402

TEXTS = list(topics.values())
PROBE = "Hello  world:\n\tdef f(x):\n        return x ** 2  # 🙂 東京 <s> </s> <unk>\n\n" + TEXTS[3][:1500]
NEW_TOKENS = 50

# A fresh interpreter: transformers alone reads each exported directory.
CHILD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
jobs = json.loads(sys.argv[1])
for job in jobs:
    model = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32).eval()
    ids = torch.tensor([job["ids"]])
    with torch.no_grad():
        logits = model(ids).logits
        greedy = model.generate(ids, max_new_tokens=job["new"], min_new_tokens=job["new"],
                                do_sample=False, pad_token_id=0)
    tokenizer = AutoTokenizer.from_pretrained(job["dir"])
    torch.save({"logits": logits, "greedy": greedy[0, ids.size(1):].tolist(),
                "text_ids": tokenizer(job["text"])["input_ids"], "class": type(model).__name__,
                "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]},
               job["result"])
assert "attnlm" not in sys.modules
"""

# naive: the attention contract itself (grouped-query, windows)
LLAMA = ["model.pos=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.attention=naive"]
CONFIGS = {  # name: (model overrides, tokenizer kind)
    "learned-bias": (["model.pos=learned", "model.bias=true"], "bpe"),
    "learned-nobias": (["model.pos=learned", "model.bias=false"], "bytes"),
    "sinusoidal": (["model.pos=sinusoidal", "model.bias=true"], "unigram"),
    "none-tanh": (["model.pos=none", "model.bias=false", "model.activation=gelu_tanh"], "chars"),
    "rope-bias": (["model.pos=rope", "model.bias=true", "model.rope_base=500"], "bytes"),
    "rope-nobias": (["model.pos=rope", "model.bias=false"], "bpe"),
    "alibi-4heads": (["model.pos=alibi"], "bytes"),
    "alibi-6heads": (["model.pos=alibi", "model.n_head=6", "model.n_embd=48"], "bytes"),
    # Llama-shaped, with n_head = 4: n_kv_head = n_head, n_head/2 and 1.
    "llama-mha-bias": ([*LLAMA, "model.bias=true", "model.rope_base=500"], "bytes"),
    "llama-gqa": ([*LLAMA, "model.n_kv_head=2", "model.mlp_hidden=40"], "bpe"),
    "llama-mqa": ([*LLAMA, "model.n_kv_head=1"], "bytes"),
    "qwen3": ([*LLAMA, "model.n_kv_head=2", "model.qk_norm=true"], "bytes"),
    "qwen3-sl-windows": ([*LLAMA, "model.qk_norm=true", "model.window=5",
                          "model.window_pattern=SL"], "bytes"),
    "mistral": ([*LLAMA, "model.n_kv_head=2", "model.window=7"], "bytes"),
    "ministral-ls-windows": ([*LLAMA, "model.n_kv_head=1", "model.window=6",
                              "model.window_pattern=LS"], "bytes"),
}
ARCH = {"rope-bias": "GPTNeoXForCausalLM", "rope-nobias": "GPTNeoXForCausalLM",
        "alibi-4heads": "MptForCausalLM", "alibi-6heads": "MptForCausalLM",
        "llama-mha-bias": "LlamaForCausalLM", "llama-gqa": "LlamaForCausalLM",
        "llama-mqa": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "qwen3-sl-windows": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
        "ministral-ls-windows": "MinistralForCausalLM"}


def make_tokenizer(kind):
    if kind in ("bpe", "unigram"):
        return tok.train_tokenizer(TokenizerConfig(kind=kind, vocab_size=400), TEXTS[:150])
    return tok.train_tokenizer(TokenizerConfig(kind=kind), [PROBE, *TEXTS[:20]])


def make_run(out, overrides, tokenizer, seed=0):
    """A run directory holding a model with random weights of every size (biases and norms
    too, so a weight in the wrong place shows)."""
    cfg = build_config(overrides=["model.n_layer=2", "model.n_head=4", "model.n_embd=32",
                                  "model.block_size=64", "model.bias=false", *overrides])
    torch.manual_seed(seed)
    model = GPT(cfg.model, tokenizer.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.5).add_(1 if p.dim() == 1 else 0)
    out.mkdir(parents=True)
    run_mod.write_config(out, cfg)
    run_mod.write_tokenizer(out, tokenizer)
    run_mod.save_checkpoint(out, {"config": to_dict(cfg), "tokenizer": tokenizer.state(),
                                  "model": model.state_dict(), "step": 0})
    return model.eval()


def greedy(model, ids, n):
    steps = generate(model, torch.tensor([ids]), n, Controls(temperature=0))
    return [int(t) for t in steps]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each configuration exported through the CLI and read back by transformers in one fresh
    process: {name: (attnlm model, tokenizer, what transformers computed, prompt ids)}."""
    root = tmp_path_factory.mktemp("export")
    tokenizers = {kind: make_tokenizer(kind) for kind in {k for _, k in CONFIGS.values()}}
    jobs, found = [], {}
    for name, (overrides, kind) in CONFIGS.items():
        model = make_run(root / name, overrides, tokenizers[kind])
        result = CliRunner().invoke(cli, ["export", str(root / name), str(root / f"{name}-hf")])
        assert result.exit_code == 0, result.output
        ids = tokenizers[kind].encode(PROBE)[:12]
        jobs.append({"dir": str(root / f"{name}-hf"), "ids": ids, "new": NEW_TOKENS,
                     "text": PROBE, "result": str(root / f"{name}.pt")})
        found[name] = (model, tokenizers[kind], ids)
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    return {name: (*found[name][:2], torch.load(root / f"{name}.pt"), found[name][2])
            for name in CONFIGS}


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_computes_the_exported_models_logits(exported, name):
    model, _, theirs, ids = exported[name]
    with torch.no_grad():
        ours, _ = model(torch.tensor([ids]))
    assert theirs["class"] == ARCH.get(name, "GPT2LMHeadModel")
    torch.testing.assert_close(theirs["logits"], ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_greedy_tokens_are_attnlms(exported, name):
    model, _, theirs, ids = exported[name]
    assert theirs["greedy"] == greedy(model, ids, NEW_TOKENS)


@pytest.mark.parametrize("name", ["learned-bias", "learned-nobias", "none-tanh", "sinusoidal"])
def test_autotokenizer_gives_attnlms_ids(exported, name):
    _, tokenizer, theirs, _ = exported[name]
    assert "</s> <unk>" in PROBE and theirs["text_ids"] == tokenizer.encode(PROBE)


def test_sentencepiece_exports_name_their_special_tokens(exported):
    assert exported["learned-bias"][2]["special"] == ["<s>", "</s>", "<unk>"]


def test_the_exported_weights_are_stored_once_with_the_format_set(tmp_path):
    from safetensors import safe_open

    make_run(tmp_path / "run", [], tok.ByteTokenizer())
    assert CliRunner().invoke(cli, ["export", str(tmp_path / "run"), str(tmp_path / "hf")]).exit_code == 0
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in f.keys() and "transformer.wte.weight" in f.keys()


def test_export_refuses_a_directory_that_holds_anything_and_takes_an_empty_one(tmp_path):
    make_run(tmp_path / "run", [], tok.ByteTokenizer())
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), str(tmp_path / "run")])
    assert result.exit_code == 2 and "not a new or empty directory" in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    (tmp_path / "empty").mkdir()
    assert CliRunner().invoke(cli, ["export", str(tmp_path / "run"), str(tmp_path / "empty")]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("target", [".", "link"])
def test_export_into_the_empty_working_directory_or_a_link_to_an_empty_folder(tmp_path, monkeypatch,
                                                                             target):
    make_run(tmp_path / "run", [], tok.ByteTokenizer())
    (tmp_path / "here").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here" if target == "." else tmp_path)
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), target])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "here" / "config.json").exists() and (tmp_path / "link").is_symlink()


def test_an_export_stopped_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    import attnlm.export

    make_run(tmp_path / "run", [], tok.ByteTokenizer())
    written = []

    def stop_at_the_second(path, data):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    monkeypatch.setattr(attnlm.export, "atomic_write", stop_at_the_second)
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert result.exit_code == 130 and written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no export, no staging


@pytest.mark.parametrize("overrides, named", [
    ([*LLAMA, "model.window=8", "model.bias=true"], "model.bias=true with a window"),
    ([*LLAMA, "model.qk_norm=true", "model.bias=true"], "model.bias=true with a window or qk_norm"),
    (["model.pos=learned", "model.n_kv_head=2"], "model.pos=learned (a Llama shape needs rope)"),
    ([*LLAMA[:2], "model.mlp=relu2"], "model.mlp=relu2 (a Llama shape needs swiglu)"),
    (["model.mlp=relu2"], "model.mlp=relu2"),
    ([*LLAMA, "model.softcap=30"], "model.softcap=30.0"),
    (["model.pos=rope", "model.mlp_hidden=100"], "model.mlp_hidden=100"),
])
def test_what_no_architecture_computes_is_refused_in_one_line(tmp_path, overrides, named):
    from attnlm.errors import InputError
    from attnlm.export import architecture

    with pytest.raises(InputError) as refused:
        architecture(build_config(overrides=overrides).model)
    message = str(refused.value)
    assert named in message and "exportable: " in message and "\n" not in message


def test_alibi_with_biases_is_refused_in_one_line(tmp_path):
    make_run(tmp_path / "run", ["model.pos=alibi", "model.bias=true"], tok.ByteTokenizer())
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "model.pos=alibi" in result.output
    assert not (tmp_path / "hf").exists()


# Import

@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2 directory as transformers writes it: a small random model and a byte-level BPE
    tokenizer trained here, with an end-of-text token."""
    import tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("gpt2")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXTS[:100], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    fast.save_pretrained(root)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() > 1 else 0.5).add_(1 if p.dim() == 1 else 0)
    model.save_pretrained(root)
    return root, model, fast


def copy_without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    return dst


def test_an_imported_gpt2_computes_what_transformers_does(gpt2_dir, tmp_path):
    src, theirs, fast = gpt2_dir
    result = CliRunner().invoke(cli, ["import", str(src), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    model, tokenizer, cfg, _ = run_mod.load_model(tmp_path / "run")
    ids = fast(PROBE)["input_ids"][:20]
    assert tokenizer.encode(PROBE)[:20] == ids and cfg.model.activation == "gelu_tanh"
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids]))[0], theirs(torch.tensor([ids])).logits,
                                   atol=1e-5, rtol=0)
        expected = theirs.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, 20:]
    out = CliRunner().invoke(cli, ["generate", str(tmp_path / "run"), "--prompt",
                                   fast.decode(ids), "--temperature", "0", "--max-new-tokens",
                                   "30", "--json"])
    assert out.exit_code == 0, out.output
    text = json.loads(out.output)["samples"][0]["text"]
    eos = fast.eos_token_id
    assert text == fast.decode([t for t in expected.tolist() if t != eos])


def test_import_reads_a_bin_as_weights_only_and_export_gives_the_same_tensors(gpt2_dir, tmp_path):
    src, theirs, fast = gpt2_dir
    binary = copy_without_weights(src, tmp_path / "bin")
    # As the original GPT-2 files: names without the model's prefix, the causal masks stored too.
    weights = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items()}
    weights |= {f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64).tril() for i in range(2)}
    torch.save(weights, binary / "pytorch_model.bin")
    assert CliRunner().invoke(cli, ["import", str(binary), "--out", str(tmp_path / "run")]).exit_code == 0
    assert CliRunner().invoke(cli, ["export", str(tmp_path / "run"), str(tmp_path / "hf")]).exit_code == 0
    original = load_file(src / "model.safetensors")
    again = load_file(tmp_path / "hf" / "model.safetensors")
    assert original.keys() == again.keys()
    for key in original:
        assert torch.equal(original[key], again[key]), key
    from transformers import AutoTokenizer

    text = PROBE + "<|endoftext|>"
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"] == fast(text)["input_ids"]


def test_a_pickle_that_runs_code_is_refused(gpt2_dir, tmp_path):
    src, _, _ = gpt2_dir
    evil = copy_without_weights(src, tmp_path / "evil")
    torch.save({"x": Path("not a tensor")}, evil / "pytorch_model.bin")
    result = CliRunner().invoke(cli, ["import", str(evil), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "weights only" in result.output
    assert not (tmp_path / "run").exists()


def test_an_imported_gpt2_evaluates_and_fine_tunes(gpt2_dir, tmp_path):
    src, _, _ = gpt2_dir
    data = text_file(tmp_path, TEXTS[7] * 3)
    run = str(tmp_path / "run")
    result = CliRunner().invoke(cli, [
        "import", str(src), "--out", run, "--set", f"data.source={data}",
        "--set", "train.max_iters=3", "--set", "train.batch_size=2", "--set", "train.eval_iters=1",
        "--set", "train.threads=1"])
    assert result.exit_code == 0, result.output
    before, _, _, _ = run_mod.load_model(run)
    assert CliRunner().invoke(cli, ["eval", run, "--json"]).exit_code == 0
    result = CliRunner().invoke(cli, ["train", "--out", run, "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    after, _, _, ckpt = run_mod.load_model(run)
    assert ckpt["step"] == 3
    assert not torch.equal(before.tok_emb.weight, after.tok_emb.weight)


def test_import_refuses_what_attnlm_cannot_compute(gpt2_dir, tmp_path):
    src, _, _ = gpt2_dir
    other = tmp_path / "other"
    shutil.copytree(src, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "n_inner": 100}))
    result = CliRunner().invoke(cli, ["import", str(other), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "n_inner=100" in result.output
    result = CliRunner().invoke(cli, ["import", str(src), "--out", str(tmp_path / "run"),
                                      "--set", "model.n_layer=3"])
    assert result.exit_code == 2 and "model.n_layer is fixed" in result.output


def test_a_new_run_trains_with_a_hugging_face_tokenizer(gpt2_dir, tmp_path):
    from tests.helpers import TINY

    src, _, fast = gpt2_dir
    data = text_file(tmp_path, TEXTS[7] * 3)
    sets = [f"data.source={data}", "tokenizer.kind=hf", f"tokenizer.model_file={src / 'tokenizer.json'}",
            *TINY, "train.max_iters=2"]
    args = ["train", "--out", str(tmp_path / "run"), "--quiet"]
    result = CliRunner().invoke(cli, [*args, *(x for s in sets for x in ("--set", s))])
    assert result.exit_code == 0, result.output
    _, tokenizer, _, _ = run_mod.load_model(tmp_path / "run")
    assert tokenizer.kind == "hf" and tokenizer.encode(PROBE) == fast(PROBE)["input_ids"]


def test_the_hf_kind_needs_a_tokenizer_file():
    from attnlm.errors import ConfigError

    with pytest.raises(ConfigError, match="tokenizer.kind='hf' needs tokenizer.model_file"):
        build_config(overrides=["tokenizer.kind=hf"])


def test_without_the_extra_the_commands_say_what_to_install(tmp_path, monkeypatch):
    import attnlm.hf_tokenizer

    def missing(name):
        raise ImportError(name)

    make_run(tmp_path / "run", [], tok.ByteTokenizer())
    monkeypatch.setattr(attnlm.hf_tokenizer.importlib, "import_module", missing)
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert result.exit_code == 1 and "pip install 'attnlm[hf]'" in result.output


def test_import_needs_the_directorys_tokenizer(gpt2_dir, tmp_path):
    src, _, _ = gpt2_dir
    bare = tmp_path / "bare"
    shutil.copytree(src, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    result = CliRunner().invoke(cli, ["import", str(bare), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "holds no tokenizer files" in result.output


def test_an_untied_head_is_refused(gpt2_dir, tmp_path):
    src, theirs, _ = gpt2_dir
    untied = copy_without_weights(src, tmp_path / "untied")
    weights = {k: v.clone() for k, v in theirs.state_dict().items()}
    weights["lm_head.weight"] += 1
    torch.save(weights, untied / "pytorch_model.bin")
    result = CliRunner().invoke(cli, ["import", str(untied), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "not tied" in result.output
