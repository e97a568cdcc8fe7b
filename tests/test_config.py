import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from attnlm import choices
from attnlm import config as config_mod, run as run_mod
from attnlm.config import RunConfig, build_config, from_dict, load_config, read_yaml, to_dict
from attnlm.errors import ConfigError, InputError
from attnlm.model import GPT

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_validate():
    assert build_config() == RunConfig()


def test_yaml_then_set_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 3\n  n_head: 2\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(path, ["model.n_layer=5"])
    assert cfg.model.n_layer == 5  # --set wins over the file
    assert cfg.model.n_head == 2  # the file wins over defaults
    assert cfg.train.lr == pytest.approx(1e-3)  # PyYAML reads 1e-3 as a string; typed by field


def test_set_values_are_typed_by_field():
    cfg = build_config(overrides=["model.bias=true", "train.max_iters=2e3", "data.source=a=b.txt",
                                  "model.dropout=0.25"])
    assert cfg.model.bias is True
    assert cfg.train.max_iters == 2000 and isinstance(cfg.train.max_iters, int)
    assert cfg.data.source == "a=b.txt"  # only the first '=' splits
    assert cfg.model.dropout == 0.25


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'model.n_heads' \(did you mean 'model.n_head'\?\)"):
        build_config(overrides=["model.n_heads=4"])
    with pytest.raises(ConfigError, match=r"unknown section 'trian' \(did you mean 'train'\?\)"):
        build_config({"trian": {"lr": 1.0}})


def test_wrong_types_are_errors():
    with pytest.raises(ConfigError, match=r"model.n_layer='four' is not a valid int"):
        build_config(overrides=["model.n_layer=four"])
    with pytest.raises(ConfigError, match=r"model.n_layer=2.5 is not a valid int"):
        build_config({"model": {"n_layer": 2.5}})
    with pytest.raises(ConfigError, match=r"model.bias='maybe' is not a valid bool"):
        build_config(overrides=["model.bias=maybe"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        build_config(overrides=["model.n_layer"])


def test_impossible_combinations_named():
    with pytest.raises(ConfigError, match=r"model.n_embd=100 is not divisible by model.n_head=3"):
        build_config(overrides=["model.n_embd=100", "model.n_head=3"])
    with pytest.raises(ConfigError, match=r"train.min_lr=0.1 must be in \[0, train.lr=0.01\]"):
        build_config(overrides=["train.lr=0.01", "train.min_lr=0.1"])
    with pytest.raises(ConfigError, match=r"model.attention='flash' must be one of"):
        build_config(overrides=["model.attention=flash"])


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as err:
        build_config(overrides=["model.n_layer=0", "train.lr=-1", "model.nope=1", "train.seed=x"])
    assert len(err.value.problems) == 4
    assert "model.n_layer=0 must be positive" in str(err.value)
    assert "train.lr=-1.0 must be a positive number" in str(err.value)


def test_non_mapping_yaml_is_an_error():
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_config(["a", "b"])
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        build_config({"model": 3})


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = build_config(overrides=["model.n_layer=2", "tokenizer.kind=bytes"])
    run_mod.write_config(tmp_path, cfg)
    assert run_mod.read_config(tmp_path) == cfg
    assert from_dict(to_dict(cfg)) == cfg


RECIPES = sorted(config_mod.RECIPES.glob("*.yaml"))  # shipped in the package, wherever pytest runs


def test_the_shipped_recipes_are_found():
    assert {p.stem for p in RECIPES} >= {"copy", "associative_recall", "shakespeare_char"}


def test_a_recipe_is_found_by_name_and_a_file_by_path(tmp_path, monkeypatch):
    assert load_config("copy") == load_config("copy.yaml") == load_config(config_mod.RECIPES / "copy.yaml")
    (tmp_path / "copy.yaml").write_text("train:\n  max_iters: 7\n")
    monkeypatch.chdir(tmp_path)  # a file of that name here wins over the recipe
    assert load_config("copy.yaml").train.max_iters == 7
    with pytest.raises(InputError, match="no recipe of that name .recipes: associative_recall, copy"):
        load_config("cpy")
    with pytest.raises(InputError, match="cannot read config elsewhere/copy.yaml"):
        load_config("elsewhere/copy.yaml")  # a path is a path, never a recipe


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_config_loads_and_builds_its_model(path):
    with open(path) as f:
        assert isinstance(yaml.safe_load(f), dict)
    cfg = load_config(path)
    model = GPT(cfg.model, vocab_size=50)
    logits, _ = model(torch.zeros(1, cfg.model.block_size, dtype=torch.long))
    assert logits.shape == (1, cfg.model.block_size, 50)


def test_the_shakespeare_recipe_follows_max_iters_and_sets_no_prompt():
    cfg = load_config("shakespeare_char", ["train.max_iters=500"])
    assert cfg.train.lr_decay_iters == 0  # the cosine ends at max_iters, however short
    assert cfg.sample.prompt == ""  # no corpus-specific default prompt


def test_importing_the_config_loads_neither_torch_nor_sentencepiece():
    code = ("import sys, attnlm.config as c; c.build_config(); "
            "print(sorted(m for m in ('torch', 'sentencepiece') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_the_registries_hold_exactly_the_names_the_config_accepts():
    from attnlm.attention import BACKENDS
    from attnlm.positional import SCHEMES
    from attnlm.runtime import DTYPES

    assert tuple(BACKENDS) == choices.BACKENDS
    assert tuple(n for n, b in BACKENDS.items() if b.dropout) == choices.DROPOUT_BACKENDS
    assert tuple(SCHEMES) == choices.POSITIONAL
    assert tuple(DTYPES) == choices.DTYPES


@pytest.mark.parametrize("override, message", [
    ("train.seed=1e30", "train.seed=1000000000000000019884624838656 must be in [0, 2**64 - 1]"),
    (f"train.seed={2**64}", "train.seed=18446744073709551616 must be in [0, 2**64 - 1]"),
    ("train.seed=-1", "train.seed=-1 must be in [0, 2**64 - 1]"),
    ("model.rope_base=inf", "model.rope_base=inf must be a finite number"),
    ("train.weight_decay=inf", "train.weight_decay=inf must be a finite number"),
    ("train.grad_clip=nan", "train.grad_clip=nan must be a finite number"),
    ("train.device=mps", "train.device='mps' must be one of auto, cpu, cuda or cuda:N"),
    ("train.device=cuda1", "(did you mean 'cuda'?)"),
    ("train.dtype=bf16", "train.dtype='bf16' must be one of float32, bfloat16, float16"),
    ("train.batch_size=1e19", "train.batch_size=10000000000000000000 must be at most 2**31 - 1"),
    (f"model.n_embd={2**31}", "model.n_embd=2147483648 must be at most 2**31 - 1"),
    ("train.threads=100000", "train.threads=100000 must be at most 1024"),
])
def test_values_that_would_fail_later_are_refused_at_config_time(override, message):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=[override])
    assert message in str(err.value) and len(err.value.problems) == 1


def test_a_whole_number_that_sizes_nothing_has_no_bound():
    # Runs saved with such values (evaluation turned off by a huge interval) still load.
    cfg = build_config(overrides=["train.eval_interval=10000000000", "train.max_iters=10000000000"])
    assert cfg.train.eval_interval == 10**10


def test_the_largest_seed_torch_takes_is_accepted():
    import torch

    cfg = build_config(overrides=[f"train.seed={2**64 - 1}", "train.device=cuda:3"])
    torch.Generator().manual_seed(cfg.train.seed)
    assert cfg.train.device == "cuda:3"  # whether it exists is checked when a run starts


def test_a_yaml_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path):
    """Nine aliases of nine: a few hundred bytes that expand to 9**7 (4.8 million) items; the
    message must name the key without printing the value."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdef", "bcdefg"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\nmodel: {n_layer: *g}\n")
    tick = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        build_config(read_yaml(path))
    assert time.perf_counter() - tick < 5
    message = str(err.value)
    assert "model.n_layer=<a list> is not a valid int (expected a single int, not a list)" in message
    assert len(message) < 400


def test_long_values_are_cut_short_in_messages():
    with pytest.raises(ConfigError) as err:
        build_config(overrides=["model.pos=" + "x" * 10000, "x" * 10000 + ".y=1"])
    assert len(str(err.value)) < 400 and "xxx..." in str(err.value)
