"""The run configuration: one tree of dataclasses, loaded from YAML and `--set` overrides.

Precedence: defaults < YAML file < `--set section.key=value`. Every problem found is reported
at once, each naming the offending key and value.
"""

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from attnlm import choices
from attnlm.errors import ConfigError, InputError


@dataclass
class ModelConfig:
    block_size: int = 64  # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # on embeddings and residual branches
    attn_dropout: float = 0.0  # on attention probabilities
    bias: bool = False  # biases in Linear and LayerNorm layers
    pos: str = "learned"  # positional scheme (see attnlm.positional)
    rope_base: float = 10000.0  # pos=rope: pair i of a head turns by base^(-2i/head_dim) a position
    attention: str = "sdpa"  # attention backend (see attnlm.attention)
    activation: str = "gelu"  # mlp=gelu's: gelu (exact) or gelu_tanh (GPT-2's approximation)
    n_kv_head: int = 0  # key/value heads, each shared by n_head/n_kv_head queries; 0: n_head
    window: int = 0  # sliding window: a query sees its own and the window-1 positions before; 0: all
    window_pattern: str = ""  # per layer, repeated: S windowed, L full (SSSL); empty: all S if window
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (learned gains)
    softcap: float = 0.0  # scores become softcap·tanh(score/softcap); 0: no cap
    norm: str = "layernorm"  # layernorm or rmsnorm
    mlp: str = "gelu"  # gelu, swiglu or relu2 (ReLU squared)
    mlp_hidden: int = 0  # the MLP's hidden width; 0: 4·n_embd, for swiglu 8/3·n_embd (to a multiple of 8)
    attn_temperature: float = 1.0  # scores are divided by attn_temperature·sqrt(head_dim)
    score: str = "dot"  # dot (scaled dot product) or additive (Bahdanau: w·tanh(q + k))
    rel_buckets: int = 32  # pos=relative: learned biases per head, one per bucket of distances
    rel_max_distance: int = 128  # pos=relative: distances from here on share the last bucket
    residual_scale: float = 1.0  # each block's attention and MLP outputs are multiplied by this


@dataclass
class DataConfig:
    source: str = "builtin:pydoc"  # file, folder, glob, builtin:pydoc or builtin:stdlib
    val_fraction: float = 0.1  # the last fraction of the text is the validation split
    cache_dir: str = ""  # token-file cache; empty means $ATTNLM_CACHE or ~/.cache/attnlm


@dataclass
class TokenizerConfig:
    kind: str = "chars"  # bytes, chars, bpe or unigram (SentencePiece, trained on the train split), hf
    vocab_size: int = 2048  # bpe and unigram: pieces, the 256 byte pieces and 3 special ones included
    model_file: str = ""  # bpe and unigram: use this SentencePiece .model instead of training one;
    # hf (needed): a Hugging Face tokenizer.json, or a directory holding a tokenizer


@dataclass
class TrainConfig:
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 1000
    lr: float = 2e-3
    min_lr: float = 2e-4  # reached at lr_decay_iters by cosine decay
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0 means max_iters
    weight_decay: float = 0.1  # applied to weight matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 250  # evaluate on val (and checkpoint) every this many steps
    eval_iters: int = 20  # val batches per evaluation; 0 means the whole val split
    keep_last: int = 0  # also keep the last N checkpoints under checkpoints/; 0 keeps only the latest
    log_interval: int = 10
    seed: int = 1337
    threads: int = 0  # torch CPU threads; 0 means all cores
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    dtype: str = "float32"  # float32, bfloat16 or float16 (autocast on CUDA)
    parallel: str = "ddp"  # under torchrun: ddp (a whole model per process) or fsdp (sharded)
    compile: bool = False  # torch.compile the model for training and evaluation
    optimizer: str = "adamw"  # adamw, or muon (Muon for the blocks' matrices, AdamW for the rest)
    head_diversity: float = 0.0  # weight of a penalty on heads of a layer whose outputs agree


@dataclass
class SampleConfig:
    prompt: str = ""
    max_new_tokens: int = 200  # 0: the prompt alone
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 40  # 0 disables top-k filtering
    num_samples: int = 1
    seed: int = 1
    top_p: float = 1.0  # nucleus sampling; 1 disables it
    min_p: float = 0.0  # drop tokens below min_p times the likeliest's probability; 0 disables it
    repetition_penalty: float = 1.0  # CTRL's penalty on tokens already in the text; 1 disables it
    stop: str = ""  # end a sample before this text; empty: no stop text


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


SECTIONS = {f.name: f.type for f in fields(RunConfig)}
KEYS = {f"{s}.{f.name}": f.type for s, cls in SECTIONS.items() for f in fields(cls)}
TRUE, FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
SEED_MAX = 2**64 - 1  # the largest seed torch's generators take
INT_MAX = 2**31 - 1  # past it, torch's sizes and counts overflow
SIZES = [k for k, typ in KEYS.items() if typ is int and k.startswith("model.")] + [
    "tokenizer.vocab_size", "train.batch_size", "train.grad_accum"]  # whole numbers that size tensors
THREADS_MAX = 1024  # more threads than any CPU has cores; far more and none can start
MAX_SAMPLE_TOKENS = 10**8  # num_samples x max_new_tokens: a token buffer that can be allocated
SHOWN = 60  # characters of a value a message shows


def _show(value):
    """A value as a message shows it: its repr, cut short. Never the repr of a list or mapping,
    which can be huge (a YAML alias bomb of a few hundred bytes expands to billions of items)."""
    if isinstance(value, (list, dict)):
        return f"<a {type(value).__name__}>"
    text = repr(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def parse_value(text, typ):
    """Parse a string into a field's type; ValueError if it does not fit."""
    if typ is bool:
        if text.lower() in TRUE:
            return True
        if text.lower() in FALSE:
            return False
        raise ValueError("expected true or false")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)  # accepts 2e3
        except ValueError:
            number = math.nan
        if not number.is_integer():
            raise ValueError("expected an integer")
        return int(number)
    if typ is float:
        return float(text)
    return text


def coerce(value, typ):
    """Check a YAML value against a field's type (numbers may arrive as strings: `1e-3`)."""
    if not isinstance(value, (str, int, float)):  # bool is an int
        raise ValueError(f"expected a single {typ.__name__}, not a {type(value).__name__}")
    if isinstance(value, str) and typ is not str:
        return parse_value(value, typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not typ:
        raise ValueError(f"expected {typ.__name__}")
    return value


def _set(tree, key, value, problems, from_text):
    if key not in KEYS:
        problems.append(f"unknown key {_show(key)}{choices.suggest(key, KEYS)}")
        return
    typ = KEYS[key]
    try:
        section, name = key.split(".")
        tree[section][name] = parse_value(value, typ) if from_text else coerce(value, typ)
    except ValueError as err:
        problems.append(f"{key}={_show(value)} is not a valid {typ.__name__} ({err})")


def _merge_yaml(tree, doc, problems):
    if doc is None:
        return
    if not isinstance(doc, dict):
        problems.append("the config file must be a mapping of sections (model:, train:, ...)")
        return
    for section, values in doc.items():
        if section not in SECTIONS:
            problems.append(f"unknown section {_show(section)}{choices.suggest(str(section), SECTIONS)}")
        elif not isinstance(values, dict):
            problems.append(f"section {section!r} must be a mapping of keys to values")
        else:
            for name, value in values.items():
                _set(tree, f"{section}.{name}", value, problems, from_text=False)


RECIPES = Path(__file__).with_name("recipes")  # shipped inside the package: found by name


def recipe_names():
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def config_file(name):
    """A --config value as a path: a file that exists, else a shipped recipe named by it
    (`shakespeare_char` or `shakespeare_char.yaml`)."""
    path = Path(name)
    if path.exists() or path.parent != Path("."):
        return path
    recipe = RECIPES / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if recipe.is_file():
        return recipe
    raise InputError(f"--config {name}: no such file, and no recipe of that name "
                     f"(recipes: {', '.join(recipe_names())})")


def read_yaml(path):
    """A YAML file's document; InputError naming the file if it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as err:
        raise InputError(f"cannot read config {path}: {err.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InputError(f"config {path} is not valid YAML: {str(err).splitlines()[0]}") from None


def build_config(yaml_doc=None, overrides=(), base=None):
    """Defaults (or `base`) < a parsed YAML document < `key=value` overrides; validated."""
    tree = dataclasses.asdict(base or RunConfig())
    problems = []
    _merge_yaml(tree, yaml_doc, problems)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"--set {item!r} must look like section.key=value")
        else:
            _set(tree, key.strip(), value.strip(), problems, from_text=True)
    cfg = RunConfig(**{s: SECTIONS[s](**tree[s]) for s in SECTIONS})
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def config_doc(name):
    """The YAML document of a --config value (a file, or a recipe by name); None for none."""
    return read_yaml(config_file(name)) if name else None


def load_config(name=None, overrides=()):
    """The config of a --config value and --set overrides."""
    return build_config(config_doc(name), overrides)


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(tree):
    """Rebuild a saved config (from a checkpoint or config.yaml), with the same checks."""
    return build_config(tree)


def _check(problems, ok, key, value, why):
    """Add 'key=value why' unless ok, or unless key already has a problem (one line a value)."""
    if not ok and not any(p.startswith(f"{key}=") for p in problems):
        problems.append(f"{key}={_show(value)} {why}")


def _value(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg):
    """Every problem with a config's values, each as 'key=value why'."""
    p = []
    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.sample
    for key in (k for k, typ in KEYS.items() if typ is float):
        _check(p, math.isfinite(_value(cfg, key)), key, _value(cfg, key), "must be a finite number")
    positive = ["model.block_size", "model.n_layer", "model.n_head", "model.n_embd",
                "model.attn_temperature", "model.residual_scale",
                "train.batch_size", "train.grad_accum", "train.max_iters", "train.eval_interval",
                "train.log_interval", "sample.num_samples"]
    for key in positive:
        _check(p, _value(cfg, key) > 0, key, _value(cfg, key), "must be positive")
    non_negative = ["train.warmup_iters", "train.lr_decay_iters", "train.eval_iters",
                    "train.keep_last", "train.threads", "train.weight_decay", "train.grad_clip",
                    "sample.top_k", "sample.max_new_tokens", "model.n_kv_head", "model.window",
                    "model.softcap", "model.mlp_hidden", "train.head_diversity"]
    for key in non_negative:
        _check(p, _value(cfg, key) >= 0, key, _value(cfg, key), "must not be negative")
    for key in ("train.seed", "sample.seed"):
        _check(p, 0 <= _value(cfg, key) <= SEED_MAX, key, _value(cfg, key),
               "must be in [0, 2**64 - 1]")
    for key in SIZES:
        _check(p, _value(cfg, key) <= INT_MAX, key, _value(cfg, key), "must be at most 2**31 - 1")
    _check(p, t.threads <= THREADS_MAX, "train.threads", t.threads, f"must be at most {THREADS_MAX}")
    if m.n_head > 0 and m.n_embd % m.n_head:
        p.append(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}")
    elif m.pos == "rope" and m.n_head > 0 and (m.n_embd // m.n_head) % 2:
        p.append(f"model.pos='rope' needs an even head dimension, not model.n_embd / model.n_head "
                 f"= {m.n_embd // m.n_head}")
    _check(p, m.rope_base > 1, "model.rope_base", m.rope_base, "must be greater than 1")
    for key, value in [("model.dropout", m.dropout), ("model.attn_dropout", m.attn_dropout)]:
        _check(p, 0 <= value < 1, key, value, "must be in [0, 1)")
    _check(p, 0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    _check(p, t.lr > 0, "train.lr", t.lr, "must be a positive number")
    _check(p, 0 <= t.min_lr and (t.lr <= 0 or t.min_lr <= t.lr), "train.min_lr", t.min_lr, f"must be in [0, train.lr={t.lr}]")
    for key, value in [("train.beta1", t.beta1), ("train.beta2", t.beta2)]:
        _check(p, 0 <= value < 1, key, value, "must be in [0, 1)")
    named = [("model.pos", m.pos, choices.POSITIONAL), ("model.attention", m.attention, choices.BACKENDS),
             ("model.activation", m.activation, choices.ACTIVATIONS),
             ("model.norm", m.norm, choices.NORMS), ("model.mlp", m.mlp, choices.MLPS),
             ("model.score", m.score, choices.SCORES),
             ("tokenizer.kind", cfg.tokenizer.kind, choices.TOKENIZERS),
             ("train.dtype", t.dtype, choices.DTYPES),
             ("train.parallel", t.parallel, choices.PARALLEL),
             ("train.optimizer", t.optimizer, choices.OPTIMIZERS)]
    _check(p, not (t.optimizer == "muon" and t.parallel == "fsdp"), "train.optimizer", t.optimizer,
           "cannot run on FSDP's shards (Muon needs each matrix whole): use train.parallel=ddp")
    for key, value, allowed in named:
        _check(p, value in allowed, key, value,
               f"must be one of {', '.join(allowed)}{choices.suggest(value, allowed)}")
    device = choices.device_problem(t.device)
    _check(p, device is None, "train.device", t.device, device)
    if m.attention in choices.BACKENDS and m.attn_dropout > 0 and m.attention not in choices.DROPOUT_BACKENDS:
        p.append(f"model.attention={m.attention!r} does not support attention dropout "
                 f"(model.attn_dropout={m.attn_dropout}); use {' or '.join(choices.DROPOUT_BACKENDS)}")
    _validate_attention(m, p)
    k = cfg.tokenizer
    if k.kind in choices.SENTENCEPIECE and not k.model_file:
        _check(p, k.vocab_size >= 260, "tokenizer.vocab_size", k.vocab_size,
               "must be at least 260 (256 byte pieces and 3 special pieces come first)")
    if k.model_file and k.kind not in (*choices.SENTENCEPIECE, "hf"):
        p.append(f"tokenizer.model_file={_show(k.model_file)} needs tokenizer.kind=bpe, unigram "
                 f"or hf (not {k.kind!r})")
    if k.kind == "hf" and not k.model_file:
        p.append("tokenizer.kind='hf' needs tokenizer.model_file (a tokenizer.json, or a "
                 "directory holding one)")
    _validate_sample(s, p)
    return p


def _validate_attention(m, p):
    """The attention variants' values that cannot work together."""
    if m.n_kv_head > 0 and m.n_head > 0 and m.n_head % m.n_kv_head:
        p.append(f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head}")
    _check(p, set(m.window_pattern) <= {"S", "L"}, "model.window_pattern", m.window_pattern,
           "may hold only S (a windowed layer) and L (a full one), as in SSSL")
    if "S" in m.window_pattern and m.window == 0:
        p.append(f"model.window_pattern={_show(m.window_pattern)} has windowed layers (S) but "
                 "model.window is 0; set model.window to their width")
    if m.activation != "gelu" and m.mlp != "gelu":
        p.append(f"model.activation={m.activation!r} is a GELU's; it needs model.mlp=gelu, "
                 f"not {m.mlp!r}")
    if m.score == "additive" and m.attention in choices.BACKENDS \
            and m.attention not in choices.ADDITIVE_BACKENDS:
        p.append(f"model.score=additive runs only with model.attention="
                 f"{' or '.join(choices.ADDITIVE_BACKENDS)}, not {m.attention!r}")
    if m.pos == "relative":
        _check(p, m.rel_buckets >= 2, "model.rel_buckets", m.rel_buckets, "must be at least 2")
        _check(p, m.rel_max_distance > m.rel_buckets // 2, "model.rel_max_distance",
               m.rel_max_distance, f"must be greater than half of model.rel_buckets "
               f"({m.rel_buckets // 2} distances have a bucket each)")


def _validate_sample(s, p):
    """Sampling ranges, chosen so that no float32 logit overflows or underflows into NaN."""
    _check(p, s.temperature == 0 or s.temperature >= 1e-4, "sample.temperature", s.temperature,
           "must be 0 (greedy) or at least 0.0001")
    _check(p, 1e-4 <= s.top_p <= 1, "sample.top_p", s.top_p, "must be in [0.0001, 1] (1 disables it)")
    _check(p, 0 <= s.min_p <= 1, "sample.min_p", s.min_p, "must be in [0, 1] (0 disables it)")
    _check(p, 0.01 <= s.repetition_penalty <= 100, "sample.repetition_penalty",
           s.repetition_penalty, "must be in [0.01, 100] (1 disables it)")
    if s.max_new_tokens * max(s.num_samples, 1) > MAX_SAMPLE_TOKENS:
        p.append(f"sample.max_new_tokens={_show(s.max_new_tokens)} times sample.num_samples="
                 f"{_show(s.num_samples)} must be at most {MAX_SAMPLE_TOKENS:,} tokens")


MAX_NAME = 100  # characters; a longer run name is cut and ends in a hash of the whole


def run_name(config_path, overrides):
    """A run directory name from a config file and --set overrides, readable and safe in any file
    system: `copy_n_head-2_pos-sinusoidal`. A key is named by its last part unless two sections
    share that (train.seed, sample.seed); a path stands for its last part (`source-input.txt`);
    characters other than letters, digits and `.+-` become `_`; a name too long is cut and ends
    in a hash of the overrides. Overrides can still share a name (two files called input.txt),
    never silently: training refuses a directory that already holds a run."""
    names = [key.rsplit(".", 1)[-1] for key in KEYS]
    parts = [Path(config_path).stem if config_path else "default"]
    for item in overrides:
        key, _, value = (s.strip() for s in item.partition("="))
        name = key.rsplit(".", 1)[-1]
        parts.append(f"{key if names.count(name) > 1 else name}-{value.rstrip('/').rsplit('/', 1)[-1]}")
    text = re.sub(r"[^A-Za-z0-9.+-]+", "_", "_".join(parts), flags=re.ASCII).strip("._")
    if len(text) > MAX_NAME:
        digest = hashlib.sha256("\0".join(overrides).encode()).hexdigest()[:10]
        text = f"{text[:MAX_NAME - 11]}_{digest}"
    return text
