"""The Python API, for notebooks and scripts: the functions the command line calls.

    import attnlm

    cfg = attnlm.load_config("shakespeare_char", ["data.source=builtin:pydoc", "train.max_iters=200"])
    attnlm.train_run(cfg, "runs/pydoc")
    run = attnlm.load_run("runs/pydoc")
    print(attnlm.generate(run, "The ", max_new_tokens=80, temperature=0.8, seed=1))
    attnlm.eval_run(run)["bits_per_byte"]

A mistake a user can act on raises attnlm.errors.AttnlmError (InputError, exit code 2 on the
command line, for bad config, input or usage) with the one-line message the command line
prints. Torch is imported by the first function that needs it, not by `import attnlm`.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from attnlm import config as config_mod


def warn(message):
    """A warning line on stderr, as the command line shows it."""
    print(f"warning: {message}", file=sys.stderr)


def load_config(config=None, overrides=()):
    """The validated RunConfig (a tree of dataclasses: model, data, tokenizer, train, sample).

    config: a YAML file or a shipped recipe by name ("shakespeare_char", "copy",
    "associative_recall"); None for the defaults. overrides: "section.key=value" strings, as
    `--set` takes them, applied on top. Every invalid value is reported in one ConfigError.
    """
    return config_mod.load_config(config, overrides)


def train_run(config, out, *, overrides=(), resume=False, quiet=False):
    """Train a model into the run directory `out` (as `attnlm train`); returns the summary dict
    (also written to out/summary.json), or None when a resumed run had nothing left to train.

    config: a RunConfig (from load_config), a YAML file or recipe name, or None for the
    defaults; overrides ("section.key=value") go on top. With resume, the run in `out`
    continues from its checkpoint under its saved config with the overrides (and the values of
    a YAML file) on top, e.g. overrides=["train.max_iters=4000"]; the model, tokenizer and data
    cannot change. quiet: no progress bar or log lines on stderr. Named train_run because
    attnlm.train is the module of the training loop.
    """
    from attnlm import train as train_mod
    from attnlm.errors import InputError

    if isinstance(config, config_mod.RunConfig):
        if resume:  # every value of a whole config would count as a change to the saved one
            raise InputError("resume continues under the run's saved config: give the changes "
                             "as overrides, not a RunConfig")
        cfg = config_mod.build_config(overrides=overrides, base=config)
    else:
        doc = config_mod.config_doc(config)
        cfg = train_mod.configure(doc, overrides, out, resume)
    return train_mod.train(cfg, out, resume=resume, quiet=quiet)


@dataclass
class Run:
    """A trained model loaded from a run directory or checkpoint file, ready to sample from."""

    path: Path
    model: object  # attnlm.model.GPT, in eval mode
    tokenizer: object
    config: config_mod.RunConfig  # the run's resolved config; its `sample` section holds the defaults


def load_run(path, *, device="auto", threads=0):
    """The Run in a run directory or checkpoint file, its model on `device` ("auto", "cpu",
    "cuda" or "cuda:N"); threads: CPU threads for torch, 0 for all cores. The checkpoint is
    verified and loaded without executing code."""
    from attnlm.run import load_model
    from attnlm.runtime import resolve_device, set_threads

    machine = machine_config(device, threads)
    set_threads(machine.threads)
    model, tokenizer, cfg, _ = load_model(path, resolve_device(machine.device))
    return Run(Path(path), model, tokenizer, cfg)


def machine_config(device="auto", threads=0):
    """The train section with device and threads set, checked as config values (a ConfigError
    names a bad one)."""
    return config_mod.build_config({"train": {"device": device, "threads": threads}}).train


def _loaded(run):
    return run if isinstance(run, Run) else load_run(run)


def sample_config(run, prompt=None, **controls):
    """The run's sample config with prompt and controls (sample.* names; None keeps the run's
    value) on top, checked as config values are: a ConfigError names a bad or unknown one."""
    given = {key: value for key, value in dict(controls, prompt=prompt).items() if value is not None}
    return config_mod.build_config({"sample": given}, base=run.config).sample


def encode_prompt(run, settings):
    """The token ids of settings.prompt (its end, with a warning on stderr, when longer than the
    model's window; a newline's for an empty prompt); InputError for text the vocabulary lacks."""
    from attnlm.prompt import prompt_ids

    return prompt_ids(run.tokenizer, settings.prompt, run.config.model.block_size, warn)


def samples(run, settings, ids=None, *, stop=None, use_cache=True, compile=False, on_text=None):
    """A sampling.Sample (text, tokens, finish) for each of settings.num_samples samples drawn
    in one batch; settings: a sample_config; ids: encode_prompt's (None: computed here). stop:
    a text or a list of texts a sample ends before (None: settings.stop). on_text(row, text)
    hears each piece of a sample's text as soon as it is final."""
    from attnlm.prompt import stop_texts
    from attnlm.sampling import Controls, complete

    ids = encode_prompt(run, settings) if ids is None else ids
    stops = [settings.stop] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    return complete(run.model, run.tokenizer, ids, settings.max_new_tokens, Controls.of(settings),
                    num_samples=settings.num_samples, seed=settings.seed, stop=stop_texts(stops),
                    use_cache=use_cache, compile=compile, on_text=on_text)


def generate(run, prompt=None, *, stop=None, use_cache=True, compile=False, on_text=None,
             **controls):
    """The text that continues `prompt` (without the prompt), as `attnlm generate` makes it;
    a list of texts when num_samples is over 1.

    run: a Run, or a run directory or checkpoint path (loaded on the default device). prompt:
    None for the run's sample.prompt; empty starts from a newline. controls: max_new_tokens,
    temperature (0 is greedy), top_k, top_p, min_p, repetition_penalty, num_samples, seed;
    each left out keeps the run's sample.* value. stop, on_text: as in `samples`. use_cache:
    False re-reads the whole window each step (the same text, slower). compile: run the model
    under torch.compile (the same text; pays for long generations).
    """
    run = _loaded(run)
    settings = sample_config(run, prompt, **controls)
    texts = [s.text for s in samples(run, settings, stop=stop, use_cache=use_cache,
                                     compile=compile, on_text=on_text)]
    return texts[0] if settings.num_samples == 1 else texts


def eval_run(run, **options):
    """The eval result dict of `attnlm eval --json`: loss, perplexity, bits_per_byte, tokens,
    bytes on the run's val split; exact_match on a synthetic task; attention entropy on demand.

    run: a Run, or a run directory or checkpoint path. options: source (evaluate this text
    source instead), batch_size, block_size, examples, attention, text, attention_map (a
    folder for PNG heat maps); see evaluate.evaluate_run. Named eval_run because
    attnlm.evaluate is the module of the eval pipeline.
    """
    from attnlm.evaluate import evaluate_run

    run = _loaded(run)
    return evaluate_run(run.model, run.tokenizer, run.config, **options)
