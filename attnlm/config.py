"""The run configuration: one tree of dataclasses, loaded from YAML and `--set` overrides.

Precedence: defaults < YAML file < `--set section.key=value`. Every problem found is reported
at once, each naming the offending key and value.
"""

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields

import yaml

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
    pos: str = "learned"  # positional scheme (see attnlm.positional.SCHEMES)
    rope_base: float = 10000.0  # pos=rope: pair i of a head turns by base^(-2i/head_dim) a position
    attention: str = "sdpa"  # attention backend (see attnlm.attention.BACKENDS)


@dataclass
class DataConfig:
    source: str = "builtin:pydoc"  # file, folder, glob, builtin:pydoc or builtin:stdlib
    val_fraction: float = 0.1  # the last fraction of the text is the validation split
    cache_dir: str = ""  # token-file cache; empty means $ATTNLM_CACHE or ~/.cache/attnlm


@dataclass
class TokenizerConfig:
    kind: str = "chars"  # bytes, chars, bpe or unigram (SentencePiece, trained on the train split)
    vocab_size: int = 2048  # bpe and unigram: pieces, the 256 byte pieces and 3 special ones included
    model_file: str = ""  # bpe and unigram: use this SentencePiece .model instead of training one


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
    device: str = "auto"  # auto, cpu or cuda
    dtype: str = "float32"  # float32, bfloat16 or float16 (autocast on CUDA)


@dataclass
class SampleConfig:
    prompt: str = ""
    max_new_tokens: int = 200
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


def _suggest(name, choices):
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
    if isinstance(value, str) and typ is not str:
        return parse_value(value, typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not typ:
        raise ValueError(f"expected {typ.__name__}")
    return value


def _set(tree, key, value, problems, from_text):
    if key not in KEYS:
        problems.append(f"unknown key {key!r}{_suggest(key, KEYS)}")
        return
    typ = KEYS[key]
    try:
        section, name = key.split(".")
        tree[section][name] = parse_value(value, typ) if from_text else coerce(value, typ)
    except ValueError as err:
        problems.append(f"{key}={value!r} is not a valid {typ.__name__} ({err})")


def _merge_yaml(tree, doc, problems):
    if doc is None:
        return
    if not isinstance(doc, dict):
        problems.append("the config file must be a mapping of sections (model:, train:, ...)")
        return
    for section, values in doc.items():
        if section not in SECTIONS:
            problems.append(f"unknown section {section!r}{_suggest(str(section), SECTIONS)}")
        elif not isinstance(values, dict):
            problems.append(f"section {section!r} must be a mapping of keys to values")
        else:
            for name, value in values.items():
                _set(tree, f"{section}.{name}", value, problems, from_text=False)


def read_yaml(path):
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as err:
        raise InputError(f"cannot read config {path}: {err.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
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


def load_config(path=None, overrides=()):
    return build_config(read_yaml(path) if path else None, overrides)


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(tree):
    """Rebuild a saved config (from a checkpoint or config.yaml), with the same checks."""
    return build_config(tree)


def dump_yaml(cfg, path):
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def _check(problems, ok, key, value, why):
    if not ok:
        problems.append(f"{key}={value!r} {why}")


def validate(cfg):
    """Every problem with a config's values, each as 'key=value why'."""
    from attnlm.attention import BACKENDS
    from attnlm.positional import SCHEMES
    from attnlm.tokenizer import KINDS

    p = []
    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.sample
    positive = ["model.block_size", "model.n_layer", "model.n_head", "model.n_embd",
                "train.batch_size", "train.grad_accum", "train.max_iters", "train.eval_interval",
                "train.log_interval", "sample.max_new_tokens", "sample.num_samples"]
    for key in positive:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(p, value > 0, key, value, "must be positive")
    non_negative = ["train.warmup_iters", "train.lr_decay_iters", "train.eval_iters",
                    "train.keep_last", "train.threads", "train.weight_decay", "train.grad_clip",
                    "sample.top_k", "sample.temperature"]
    for key in non_negative:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(p, value >= 0, key, value, "must not be negative")
    if m.n_head > 0 and m.n_embd % m.n_head:
        p.append(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}")
    elif m.pos == "rope" and m.n_head > 0 and (m.n_embd // m.n_head) % 2:
        p.append(f"model.pos='rope' needs an even head dimension, not model.n_embd / model.n_head "
                 f"= {m.n_embd // m.n_head}")
    _check(p, m.rope_base > 1, "model.rope_base", m.rope_base, "must be greater than 1")
    for key, value in [("model.dropout", m.dropout), ("model.attn_dropout", m.attn_dropout)]:
        _check(p, 0 <= value < 1, key, value, "must be in [0, 1)")
    _check(p, 0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    _check(p, t.lr > 0 and math.isfinite(t.lr), "train.lr", t.lr, "must be a positive number")
    _check(p, 0 <= t.min_lr and (t.lr <= 0 or t.min_lr <= t.lr), "train.min_lr", t.min_lr, f"must be in [0, train.lr={t.lr}]")
    for key, value in [("train.beta1", t.beta1), ("train.beta2", t.beta2)]:
        _check(p, 0 <= value < 1, key, value, "must be in [0, 1)")
    choices = [("model.pos", m.pos, SCHEMES), ("model.attention", m.attention, BACKENDS),
               ("tokenizer.kind", cfg.tokenizer.kind, KINDS),
               ("train.device", t.device, ("auto", "cpu", "cuda")),
               ("train.dtype", t.dtype, ("float32", "bfloat16", "float16"))]
    for key, value, allowed in choices:
        _check(p, value in allowed, key, value, f"must be one of {', '.join(allowed)}")
    if m.attention in BACKENDS and m.attn_dropout > 0 and not BACKENDS[m.attention].dropout:
        p.append(f"model.attention={m.attention!r} does not support attention dropout "
                 f"(model.attn_dropout={m.attn_dropout}); use naive or sdpa")
    k = cfg.tokenizer
    if k.kind in ("bpe", "unigram") and not k.model_file:
        _check(p, k.vocab_size >= 260, "tokenizer.vocab_size", k.vocab_size,
               "must be at least 260 (256 byte pieces and 3 special pieces come first)")
    if k.model_file and k.kind not in ("bpe", "unigram"):
        p.append(f"tokenizer.model_file={k.model_file!r} needs tokenizer.kind=bpe or unigram "
                 f"(not {k.kind!r})")
    _check(p, 0 < s.top_p <= 1, "sample.top_p", s.top_p, "must be in (0, 1]")
    _check(p, 0 <= s.min_p <= 1, "sample.min_p", s.min_p, "must be in [0, 1]")
    _check(p, s.repetition_penalty > 0, "sample.repetition_penalty", s.repetition_penalty,
           "must be positive")
    return p
