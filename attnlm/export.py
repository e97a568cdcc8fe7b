"""Hugging Face export and import: a run as a directory transformers loads without custom code,
and a local GPT-2 directory as a run. Only exact mappings: what transformers would compute
otherwise is refused, never approximated.

    layernorm + gelu, n_kv_head = n_head, no window, no qk_norm:
      learned, sinusoidal, none   GPT2LMHeadModel (a fixed position table for sinusoidal and none)
      rope                        GPTNeoXForCausalLM, rotary_pct 1.0, sequential residual
      alibi, model.bias=false     MptForCausalLM (MPT has no biases: with them, refused)
    rope + rmsnorm + swiglu, any n_kv_head (Llama-shaped):
      bias on or off              LlamaForCausalLM
      qk_norm, no bias            Qwen3ForCausalLM (windows, if any, as its layer types)
      window on every layer       MistralForCausalLM
      window on some layers       MinistralForCausalLM

Needs the optional extra: pip install 'attnlm[hf]'.
"""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import torch

from attnlm import config as config_mod, run as run_mod
from attnlm.errors import InputError
from attnlm.files import atomic_write, temp_path, write_errors
from attnlm.hf_tokenizer import LIMITS, HFTokenizer, require, to_hf, tokenizer_config
from attnlm.model import RMS_EPS, kv_heads, layer_windows, mlp_width

CONFIG, WEIGHTS = "config.json", "model.safetensors"
ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # ours -> transformers'
LAYER_NORM_EPS = 1e-5  # torch's LayerNorm default, which attnlm's norms use


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where attnlm's weights sit in a transformers architecture, and how they are stored."""
    cls: str  # the transformers model class
    embedding: str
    layer: str  # the prefix of layer i's names, with {} for i
    modules: tuple  # (attnlm's module, theirs, or a tuple of theirs its rows are split into)
    final_norm: str
    params: tuple = ("weight", "bias")  # an architecture without biases has weights alone
    zero_biases: bool = True  # a bias attnlm leaves out is stored as zeros; else left out too

    def names(self, n_layer):
        """(attnlm's name, transformers' name or names, attnlm's module) of every weight."""
        yield "tok_emb.weight", f"{self.embedding}.weight", "tok_emb"
        for i in range(n_layer):
            prefix = self.layer.format(i)
            for ours, theirs in self.modules:
                for p in self.params:
                    name = (tuple(f"{prefix}{t}.{p}" for t in theirs) if isinstance(theirs, tuple)
                            else f"{prefix}{theirs}.{p}")
                    yield f"blocks.{i}.{ours}.{p}", name, ours
        for p in self.params:
            yield f"norm.{p}", f"{self.final_norm}.{p}", "norm"


def _llama_layout(cls, extra=()):
    return Layout(cls, "model.embed_tokens", "model.layers.{}.",
                  (("norm1", "input_layernorm"),
                   ("attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                   ("attn.proj", "self_attn.o_proj"), ("norm2", "post_attention_layernorm"),
                   ("mlp.fc", ("mlp.gate_proj", "mlp.up_proj")), ("mlp.proj", "mlp.down_proj"),
                   *extra),
                  "model.norm", zero_biases=False)


LAYOUTS = {
    "gpt2": Layout("GPT2LMHeadModel", "transformer.wte", "transformer.h.{}.",
                   (("norm1", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                    ("norm2", "ln_2"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")),
                   "transformer.ln_f"),
    "gpt_neox": Layout("GPTNeoXForCausalLM", "gpt_neox.embed_in", "gpt_neox.layers.{}.",
                       (("norm1", "input_layernorm"), ("attn.qkv", "attention.query_key_value"),
                        ("attn.proj", "attention.dense"), ("norm2", "post_attention_layernorm"),
                        ("mlp.fc", "mlp.dense_h_to_4h"), ("mlp.proj", "mlp.dense_4h_to_h")),
                       "gpt_neox.final_layer_norm"),
    "mpt": Layout("MptForCausalLM", "transformer.wte", "transformer.blocks.{}.",
                  (("norm1", "norm_1"), ("attn.qkv", "attn.Wqkv"), ("attn.proj", "attn.out_proj"),
                   ("norm2", "norm_2"), ("mlp.fc", "ffn.up_proj"), ("mlp.proj", "ffn.down_proj")),
                  "transformer.norm_f", params=("weight",)),
    "llama": _llama_layout("LlamaForCausalLM"),
    # Qwen3's QK-norm is attnlm's: an RMSNorm over each head's dimensions, before RoPE.
    "qwen3": _llama_layout("Qwen3ForCausalLM", (("attn.q_norm", "self_attn.q_norm"),
                                                ("attn.k_norm", "self_attn.k_norm"))),
    "mistral": _llama_layout("MistralForCausalLM"),
    "ministral": _llama_layout("MinistralForCausalLM"),
}
LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def _to_theirs(arch, module, t, n_head):
    """One attnlm tensor as the architecture stores it: GPT-2 keeps Linear weights transposed
    (Conv1D); GPT-NeoX orders the fused qkv rows head by head, [q k v of head 0 | of head 1 ..],
    where attnlm has [q heads | k heads | v heads]."""
    if arch == "gpt2" and module in LINEARS and t.dim() == 2:
        return t.t()
    if arch == "gpt_neox" and module == "attn.qkv":
        return t.reshape(3, n_head, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return t


def _split(module, t, m):
    """A fused attnlm tensor as the separate ones of a Llama-shaped model: qkv's rows are
    [q heads | k heads | v heads] (n_kv_head key and value heads), SwiGLU's fc's [gate | up]."""
    if module == "attn.qkv":
        head_dim = m.n_embd // m.n_head
        return t.split((m.n_head * head_dim, kv_heads(m) * head_dim, kv_heads(m) * head_dim))
    return t.chunk(2)


# Model settings that no exported architecture computes at another value.
FIXED = {"softcap": 0.0, "attn_temperature": 1.0, "score": "dot", "residual_scale": 1.0}
LLAMA_SHAPE = {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
EXPORTABLE = ("exportable: layernorm + gelu with n_kv_head = n_head and learned, sinusoidal or no "
              "positions (GPT-2), rope (GPT-NeoX) or alibi without biases (MPT); rope + rmsnorm + "
              "swiglu with any n_kv_head (Llama), with qk_norm (Qwen3), a window on every layer "
              "(Mistral) or on some (Ministral), these three without biases")


def architecture(m):
    """The transformers architecture that computes a ModelConfig exactly ('gpt2', 'gpt_neox',
    'mpt', 'llama', 'qwen3', 'mistral' or 'ministral'), or InputError naming each setting that
    none computes and what is exportable."""
    problems = [f"model.{key}={getattr(m, key)}" for key, plain in FIXED.items()
                if getattr(m, key) != plain]
    windows = [w for w in layer_windows(m) if w]
    if m.norm == "rmsnorm" or m.mlp == "swiglu" or kv_heads(m) != m.n_head or windows or m.qk_norm:
        problems += [f"model.{key}={getattr(m, key)} (a Llama shape needs {need})"
                     for key, need in LLAMA_SHAPE.items() if getattr(m, key) != need]
        if m.bias and (windows or m.qk_norm):
            problems.append("model.bias=true with a window or qk_norm (Qwen3, Mistral and "
                            "Ministral have no MLP biases)")
        arch = ("qwen3" if m.qk_norm else "mistral" if len(windows) == m.n_layer
                else "ministral" if windows else "llama")
    else:
        if m.pos == "relative":
            problems.append("model.pos=relative")
        if m.mlp != "gelu":
            problems.append(f"model.mlp={m.mlp}")
        if m.mlp_hidden not in (0, 4 * m.n_embd):
            problems.append(f"model.mlp_hidden={m.mlp_hidden} (gelu's needs {4 * m.n_embd})")
        if m.pos == "alibi" and m.bias:
            problems.append("model.pos=alibi with model.bias=true (MPT has no biases)")
        if m.pos == "alibi" and m.activation != "gelu":
            problems.append(f"model.pos=alibi with model.activation={m.activation} (MPT's GELU "
                            "is the exact one)")
        arch = {"alibi": "mpt", "rope": "gpt_neox"}.get(m.pos, "gpt2")
    if problems:
        raise InputError(f"cannot be exported exactly: {', '.join(problems)}; {EXPORTABLE}")
    return arch


def _position_table(model):
    """GPT-2's wpe: the learned table, the sinusoidal one over block_size, or zeros for none."""
    n = model.cfg.block_size
    if model.pos_emb is None:
        return torch.zeros(n, model.cfg.n_embd)
    return model.pos_emb(0, n)


def hf_tensors(model, arch):
    """The model's weights under transformers' names, ready for safetensors (the tied head
    stored once, as the embedding: transformers ties it back on load)."""
    layout, m = LAYOUTS[arch], model.cfg
    ours = model.state_dict()
    out = {}
    for a, b, module in layout.names(m.n_layer):
        if a in ours:
            t = ours[a]
        elif layout.zero_biases:  # a bias attnlm leaves out (model.bias=false) is zeros there
            t = torch.zeros(len(ours[a.replace(".bias", ".weight")]))
        else:
            continue
        if isinstance(b, tuple):
            out.update(zip(b, _split(module, t, m)))
        else:
            out[b] = _to_theirs(arch, module, t, m.n_head)
    if arch == "gpt2":
        out["transformer.wpe.weight"] = _position_table(model)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def _llama_config(transformers, m, arch, common):
    """Llama and its relatives: the same block, with QK-norm (Qwen3) or sliding windows of W
    keys, the query's own included, as attnlm's (transformers: key > query - W)."""
    types = ["sliding_attention" if w else "full_attention" for w in layer_windows(m)]
    extra = {"llama": dict(attention_bias=m.bias, mlp_bias=m.bias),
             "qwen3": dict(use_sliding_window=bool(m.window), sliding_window=m.window or None,
                           layer_types=types),
             "mistral": dict(sliding_window=m.window),
             "ministral": dict(sliding_window=m.window, layer_types=types)}[arch]
    return transformers.AutoConfig.for_model(
        arch, hidden_size=m.n_embd, intermediate_size=mlp_width(m), num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head, num_key_value_heads=kv_heads(m),
        head_dim=m.n_embd // m.n_head, hidden_act="silu", max_position_embeddings=m.block_size,
        rms_norm_eps=RMS_EPS, rope_parameters={"rope_type": "default", "rope_theta": m.rope_base},
        attention_dropout=m.attn_dropout, **extra, **common)


def hf_config(m, vocab_size, eos_id, arch):
    transformers = require("transformers")
    common = dict(vocab_size=vocab_size, tie_word_embeddings=True, bos_token_id=eos_id,
                  eos_token_id=eos_id, architectures=[LAYOUTS[arch].cls])
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
            n_inner=4 * m.n_embd, activation_function=ACTIVATIONS[m.activation],
            resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.attn_dropout,
            layer_norm_epsilon=LAYER_NORM_EPS, **common)
    if arch == "mpt":  # ALiBi with attnlm's slopes for any head count; no position past max_seq_len
        return transformers.MptConfig(
            d_model=m.n_embd, n_heads=m.n_head, n_layers=m.n_layer, expansion_ratio=4,
            max_seq_len=m.block_size, no_bias=True, layer_norm_epsilon=LAYER_NORM_EPS,
            resid_pdrop=m.dropout, emb_pdrop=m.dropout,
            # MPT's attn_pdrop drops in its MLP too, unlike attnlm's: left at 0 (training only)
            attn_config={"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0}, **common)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=m.n_embd, num_hidden_layers=m.n_layer, num_attention_heads=m.n_head,
            intermediate_size=4 * m.n_embd, hidden_act=ACTIVATIONS[m.activation],
            max_position_embeddings=m.block_size, rotary_pct=1.0, rotary_emb_base=m.rope_base,
            use_parallel_residual=False, attention_bias=True, layer_norm_eps=LAYER_NORM_EPS,
            hidden_dropout=m.dropout, attention_dropout=m.attn_dropout, **common)
    return _llama_config(transformers, m, arch, common)


def export_run(run, out):
    """Write run (a run directory or checkpoint) as a transformers directory at out: config.json,
    model.safetensors, and the tokenizer (tokenizer.json, tokenizer_config.json). Returns the
    architecture's name. Where the tokenizer cannot give attnlm's ids, stderr says so."""
    safetensors_torch = require("safetensors.torch")
    model, tokenizer, cfg, _ = run_mod.load_model(run)
    arch = architecture(cfg.model)
    eos_id = getattr(tokenizer, "eos_id", None)
    config = hf_config(cfg.model, tokenizer.vocab_size, eos_id, arch)
    tensors = hf_tensors(model, arch)
    out = Path(out).resolve()  # "." and a link to a folder have a name and a parent
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} is not a new or empty directory; export into one (nothing in "
                         "it is replaced: it could be a run, or another export)")
    # Written beside it, then renamed into place: the export appears whole or not at all.
    staging = temp_path(out)
    try:
        staging.mkdir(parents=True)
    except OSError as err:
        raise InputError(f"cannot create {out}: {err.strerror}") from None
    try:
        with write_errors(out):
            atomic_write(staging / WEIGHTS, safetensors_torch.save(tensors, metadata={"format": "pt"}))
            atomic_write(staging / CONFIG, config.to_json_string())
            atomic_write(staging / "tokenizer.json", to_hf(tokenizer))
            atomic_write(staging / "tokenizer_config.json",
                         tokenizer_config(tokenizer, cfg.model.block_size))
            staging.replace(out)  # over an empty folder too
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if tokenizer.kind in LIMITS:
        run_mod.note(f"note: the exported {tokenizer.kind} tokenizer gives attnlm's ids except: "
                     f"{LIMITS[tokenizer.kind]}")
    return config.architectures[0]


# Import: a GPT-2 directory as a run.

def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path}: {err}") from None


def read_weights(src):
    """The tensors of a transformers directory: model.safetensors, else pytorch_model.bin loaded
    with weights_only (nothing in it runs)."""
    src = Path(src)
    if (src / WEIGHTS).is_file():
        safetensors_torch = require("safetensors.torch")
        try:
            return safetensors_torch.load_file(src / WEIGHTS)
        except Exception as err:  # safetensors raises its own types for a damaged file
            raise InputError(f"{src / WEIGHTS} is not a readable safetensors file ({err})") from None
    if (src / "pytorch_model.bin").is_file():
        try:
            return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as err:
            raise InputError(f"{src / 'pytorch_model.bin'} cannot be loaded as weights only "
                             f"({str(err).splitlines()[0]}); refused") from None
    raise InputError(f"{src} holds neither {WEIGHTS} nor pytorch_model.bin")


GPT2_EXACT = {  # config values attnlm's blocks compute; another value is refused
    "layer_norm_epsilon": LAYER_NORM_EPS, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
    "tie_word_embeddings": True,
}


def gpt2_model_config(hf):
    """attnlm's ModelConfig values for a GPT-2 config.json, or InputError naming what differs."""
    if hf.get("model_type") != "gpt2":
        raise InputError(f"only GPT-2 directories can be imported, not model_type="
                         f"{hf.get('model_type')!r}")
    for key, value in GPT2_EXACT.items():
        if hf.get(key, value) != value:
            raise InputError(f"config.json has {key}={hf[key]!r}; attnlm computes {value!r} only")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise InputError(f"config.json has n_inner={hf['n_inner']}; attnlm's MLP is 4 x n_embd")
    names = {theirs: ours for ours, theirs in ACTIVATIONS.items()} | {"gelu_new": "gelu_tanh"}
    act = hf.get("activation_function", "gelu_new")
    if act not in names:
        raise InputError(f"config.json has activation_function={act!r}; attnlm has "
                         f"{', '.join(names)}")
    return {"block_size": hf.get("n_positions", 1024), "n_layer": hf.get("n_layer", 12),
            "n_head": hf.get("n_head", 12), "n_embd": n_embd, "bias": True, "pos": "learned",
            "activation": names[act], "dropout": hf.get("resid_pdrop", 0.1),
            "attn_dropout": hf.get("attn_pdrop", 0.1)}


def gpt2_state(tensors, n_layer):
    """attnlm's state dict from GPT-2 tensors (with or without the 'transformer.' prefix; the
    attention masks older files store, and a head tied to the embedding, left out)."""
    found = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v
             for k, v in tensors.items()}
    head = found.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, found.get("transformer.wte.weight", head)):
        raise InputError("the model's output head is not tied to its embedding; attnlm ties them")
    state = {}
    for ours, theirs, module in LAYOUTS["gpt2"].names(n_layer):
        if theirs not in found:
            raise InputError(f"the weights lack {theirs}")
        state[ours] = _to_theirs("gpt2", module, found[theirs], None)  # a transpose: its own inverse
    state["pos_emb.table.weight"] = found["transformer.wpe.weight"]
    state["head.weight"] = state["tok_emb.weight"]  # tied
    return {k: v.float().contiguous() for k, v in state.items()}


def import_gpt2(src, out, yaml_doc=None, overrides=()):
    """Make a run at out from the GPT-2 directory src: config (the model's values, with the
    user's config and --set on top for data, training and sampling), its tokenizer (kind hf),
    and a step-0 checkpoint that generate, eval and train --resume use."""
    from attnlm.model import GPT
    from attnlm.train import fix_schedule, make_optimizer

    src = Path(src)
    if not (src / CONFIG).is_file():
        raise InputError(f"{src} holds no {CONFIG} (is it a transformers model directory?)")
    values = gpt2_model_config(_read_json(src / CONFIG))
    tokenizer = HFTokenizer.from_path(src)
    base = config_mod.build_config({"model": values, "tokenizer": {
        "kind": "hf", "model_file": str(src.resolve()), "vocab_size": tokenizer.vocab_size}})
    cfg = fix_schedule(config_mod.build_config(yaml_doc, overrides, base=base))
    for key, value in values.items():
        if key not in ("dropout", "attn_dropout") and getattr(cfg.model, key) != value:
            raise InputError(f"model.{key} is fixed by the imported weights ({value!r})")
    if dataclasses.asdict(cfg.tokenizer) != dataclasses.asdict(base.tokenizer):
        raise InputError("the tokenizer section is fixed by the imported directory")
    state = gpt2_state(read_weights(src), values["n_layer"])
    rows = state["tok_emb.weight"].size(0)
    if rows != tokenizer.vocab_size:
        raise InputError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens, the model "
                         f"{rows}; attnlm needs them equal")
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, rows)
    model.load_state_dict(state)
    with run_mod.lock(out):
        run_mod.refuse_existing(out)
        run_mod.write_config(out, cfg)
        run_mod.write_tokenizer(out, tokenizer)
        run_mod.save_checkpoint(out, {  # what a run's first checkpoint holds, before any step
            "config": config_mod.to_dict(cfg), "tokenizer": tokenizer.state(),
            "model": model.state_dict(),
            "optimizer": make_optimizer(model, cfg.train).state_dict(),
            "scaler": {}, "sampler": {"generator": torch.Generator().manual_seed(cfg.train.seed).get_state()},
            "world_size": 1, "step": 0,
            "best_val_loss": math.inf,
        })
    return cfg
