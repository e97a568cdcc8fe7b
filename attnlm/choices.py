"""The names a config value may take, defined once and torch-free: the config validates against
them, the CLI offers them, and each registry (attention backends, positional schemes,
tokenizers) is tested to hold exactly these."""

import difflib
import re

BACKENDS = ("naive", "sdpa", "tiled", "triton")
DROPOUT_BACKENDS = ("naive", "sdpa")  # those that can drop attention probabilities
ADDITIVE_BACKENDS = ("naive",)  # those that can score additively (model.score=additive)
POSITIONAL = ("learned", "sinusoidal", "rope", "alibi", "relative", "none")
TOKENIZERS = ("bytes", "chars", "bpe", "unigram", "hf")
SENTENCEPIECE = ("bpe", "unigram")  # the tokenizers attnlm trains with SentencePiece
ACTIVATIONS = ("gelu", "gelu_tanh")  # the MLP's GELU: exact, or the tanh approximation (GPT-2)
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
SCORES = ("dot", "additive")  # scaled dot product, or Bahdanau's w·tanh(q + k)
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")  # and cuda:N, one GPU of several
PARALLEL = ("ddp", "fsdp")  # how the processes of a torchrun job share the model
OPTIMIZERS = ("adamw", "muon")  # muon: Muon for the blocks' matrices, AdamW for the rest


def device_problem(name):
    """Why `name` is not a device attnlm can run on, or None; whether CUDA device N exists is
    known only at run time (runtime.resolve_device)."""
    if name in DEVICES or re.fullmatch(r"cuda:\d+", name):
        return None
    return f"must be one of {', '.join(DEVICES)} or cuda:N{suggest(name, DEVICES)}"


def suggest(name, choices):
    """' (did you mean 'x'?)' for the nearest of choices, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
