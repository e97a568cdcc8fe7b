"""Command line: attnlm train | generate | eval | inspect | gather | plot | export | import.
Parses, calls the library (the Python API in attnlm.api where one serves) and prints;
cli_support.Group maps expected errors to one line and an exit code (0 ok, 1 runtime, 2
usage/input, 130 interrupt, 141 pipe closed)."""

import json
import os
import signal

import click
import yaml

from attnlm import api, config as config_mod
from attnlm.cli_support import (Group, config_option, json_option, machine_options,
                                named_as_options, positive, quiet_option, runs_argument,
                                sampling_options, set_option)
from attnlm.errors import InputError


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="attnlm")
@click.pass_context
def cli(ctx, debug):
    """Train, sample and evaluate small causal Transformer language models."""
    ctx.obj = {"debug": debug}
    if ctx.invoked_subcommand != "train" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        from attnlm.distributed import shared  # torch's import, in this case only

        # Each rank would do the whole job alone and write the same files: refuse, once.
        raise shared(InputError(f"attnlm {ctx.invoked_subcommand} runs in one process; of "
                                "attnlm's commands only train runs under torchrun"))


MACHINE = {"train.device": "--device", "train.threads": "--threads"}  # machine_options' keys


def load_for_command(run, device, threads):
    """api.load_run, a bad --device or --threads named as the option (and a bad value in the
    checkpoint's own config as its key)."""
    with named_as_options(MACHINE):
        api.machine_config(device, threads)
    return api.load_run(run, device=device, threads=threads)


@cli.command()
@config_option
@set_option
@click.option("--out", type=click.Path(file_okay=False),
              help="Run directory [default: runs/ + the config name and overrides].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--dry-run", is_flag=True,
              help="Check the config and data source, print the resolved config, train nothing.")
@json_option
@quiet_option
def train(config_path, overrides, out, resume, dry_run, as_json, quiet):
    """Train a model; writes config, tokenizer, checkpoint and metrics into the run directory.

    Ctrl-C stops after the current step, saves a checkpoint and exits 130; --resume continues.
    Under torchrun (`torchrun --nproc_per_node=N -m attnlm train ...`) the processes train one
    model into one run directory: a step takes batch_size x grad_accum x N sequences.
    """
    from attnlm.interrupt import deferred_interrupts

    with deferred_interrupts():  # first of all: no signal is lost, not even during imports
        from attnlm import distributed, run, train as train_mod

        named = out is not None
        out = out or "runs/" + config_mod.run_name(config_path, overrides)
        if resume and not named and not os.path.isdir(out):
            raise InputError(f"--resume: no run in {out}, the default --out for this config; "
                             "name the run to continue with --out")
        with distributed.alike_on_every_rank():
            doc = config_mod.config_doc(config_path)
        cfg = train_mod.configure(doc, overrides, out, resume)
        if dry_run:
            train_mod.dry_run(cfg, out, resume, quiet)
            tree = config_mod.to_dict(cfg)
            if distributed.world().main:  # one job, one report
                click.echo(json.dumps(tree) if as_json else yaml.safe_dump(tree, sort_keys=False),
                           nl=as_json)
            return
        summary = train_mod.train(cfg, out, resume=resume, quiet=quiet)
    if not distributed.world().main:  # one job, one report: rank 0's
        return
    if summary is None:
        click.echo(json.dumps(run.read_summary(out)) if as_json else
                   f"{out} has already run train.max_iters={cfg.train.max_iters} steps; nothing "
                   "trained, summary.json left as it was (raise train.max_iters to go on)")
    elif as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"trained {summary['steps']} steps into {out}: val loss {summary['val_loss']:.4f}, "
                   f"{summary['tokens_per_s'] or 0:,.0f} tokens/s")


@cli.command()
@click.argument("run")
@click.option("--prompt", help="Text to continue. Empty: start from a newline.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="Read the prompt from a file.")
@sampling_options
@click.option("--stop", multiple=True, metavar="TEXT",
              help="End a sample before this text; repeatable. \\n and \\t mean newline and tab; "
                   "a stop text with a newline also stops at a Windows line end (\\r\\n).")
@click.option("--no-cache", is_flag=True,
              help="Re-read the whole window at every step instead of using the KV cache (slow; "
                   "for comparison). Produces the same text.")
@click.option("--compile", "compile_steps", is_flag=True,
              help="Run the model under torch.compile, after 5-51 s of compiling before the "
                   "first token. Whether it is faster then depends on the CPU: 1.03-1.28x the "
                   "tokens/s on an Intel Xeon (paying past some 10,000 tokens with a warm "
                   "compile cache, 100,000 cold), slower on an AMD EPYC; benchmarks/generate.py "
                   "measures yours. Produces the same text.")
@machine_options
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (each sample's text and token count, tokens/s) "
                   "instead of streaming the text.")
def generate(run, prompt, prompt_file, stop, no_cache, compile_steps, device, threads, as_json,
             **sample):
    """Continue a prompt with a trained model (RUN: a run directory or checkpoint file).

    Text is printed as it is generated; with several samples, the first streams and the others
    follow, each after a line '---'. Each sampling option overrides the run's sample.* value of
    the same name, and is checked as that value is; left out, the run's value holds. A sample
    ends after --max-new-tokens tokens, before a --stop text, or at the tokenizer's end-of-text
    token where it has one.

    The context window is the model's block_size tokens: a longer prompt keeps its last
    block_size tokens (with a warning). Once the window is full, generation keeps its last half
    (block_size // 2 tokens) and goes on from there, with or without --no-cache. A model
    whose every layer has a sliding window (and positions other than learned) never crops: it
    generates without end, its cache a ring of window positions per layer.

    The run's attention backend runs every step. On the CPU, with the cache and without
    --compile, each step of one position uses torch's own kernels rather than oneDNN's, and
    before the first one generation times the weight products as one product each and split
    into four, and keeps the faster (the same tokens either way).
    """
    import time

    from attnlm.prompt import prompt_text, unescape

    loaded = load_for_command(run, device, threads)
    given = {f"sample.{name}": f"--{name.replace('_', '-')}" for name, value in sample.items()
             if value is not None}
    with named_as_options(given):
        s = api.sample_config(loaded, prompt_text(prompt, prompt_file), **sample)
    ids = api.encode_prompt(loaded, s)

    def show(row, piece):
        if row == 0 and not as_json:
            click.echo(piece, nl=False)

    show(0, s.prompt)
    tick = time.perf_counter()
    samples = api.samples(loaded, s, ids, stop=[unescape(x) for x in stop] or None,
                          use_cache=not no_cache, compile=compile_steps, on_text=show)
    seconds = time.perf_counter() - tick
    tokens = sum(sample.tokens for sample in samples)
    if as_json:
        click.echo(json.dumps({"prompt": s.prompt, "samples": [vars(x) for x in samples],
                               "tokens": tokens, "seconds": seconds,
                               "tokens_per_s": tokens / seconds if seconds else None,
                               "cache": not no_cache}))
        return
    click.echo()
    for sample in samples[1:]:
        click.echo("---")
        click.echo(s.prompt + sample.text)


@cli.command("eval")
@click.argument("run")
@click.option("--source", help="Evaluate the whole of this source instead of the run's val split.")
@click.option("--batch-size", type=positive, default=16, show_default=True, help="Windows per batch.")
@click.option("--block-size", type=positive, metavar="N",
              help="Read the text in windows of N tokens [default: the trained block_size]. Longer "
                   "than trained tests how the positional scheme extrapolates; learned positions "
                   "cannot.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="Place each window N positions later: a model that knows only distances "
                   "between tokens (rope, alibi, relative, none) scores the same loss; absolute "
                   "positions (sinusoidal) change it, and learned ones refuse past block_size.")
@click.option("--examples", type=positive, default=500, show_default=True,
              help="Synthetic tasks: held-out examples to score exact match on.")
@click.option("--attention", is_flag=True,
              help="Also report each layer's and head's attention entropy on one text, and how "
                   "alike each layer's heads attend and output.")
@click.option("--text", help="The text for --attention and --attention-map (implies --attention) "
                             "[default: the first block_size tokens of the evaluated text].")
@click.option("--attention-map", type=click.Path(file_okay=False), metavar="DIR",
              help="Write the text's attention weights as PNG heat maps into DIR, one image per "
                   "layer with its heads side by side (implies --attention; needs attnlm[plot]). "
                   "They show what each position gathered, not why the model decided.")
@machine_options
@json_option
def evaluate(run, device, threads, as_json, **options):
    """Loss, perplexity and bits per byte of a trained model (RUN: run directory or checkpoint).

    On a synthetic task (data.source or --source synthetic:...), also the exact-match accuracy of
    greedy answers to held-out prompts, with the accuracy of uniform guessing for scale.

    --attention reports, per layer and head, the entropy of the attention weights (nats), averaged
    over the text's query positions, beside the most it can be (uniform attention over the keys
    each query sees), and per layer the similarity of its heads: of their attention weights (1 -
    Jensen-Shannon divergence in bits, mean over pairs and query positions) and of their outputs
    (cosine). Attention weights show what was gathered, not why the model decided.
    """
    from attnlm.evaluate import describe

    loaded = load_for_command(run, device, threads)
    with named_as_options({"data.source": "--source"} if options["source"] is not None else {}):
        result = api.eval_run(loaded, **options)
    click.echo(json.dumps(result) if as_json else "\n".join(describe(result)))


@cli.command()
@click.argument("run", required=False)
@config_option
@set_option
@click.option("--vocab-size", type=positive,
              help="Vocabulary of a new model (the random tokens it reads are drawn from it) "
                   "[default: 256].")
@click.option("--batch-size", type=positive, default=4, show_default=True,
              help="Windows of model.block_size tokens read at once.")
@click.option("--iterations", type=positive, default=50, show_default=True,
              help="Power-iteration steps for each block's Jacobian norm.")
@machine_options
@json_option
def inspect(run, config_path, overrides, vocab_size, batch_size, iterations, device, threads,
            as_json):
    """Depth diagnostic: how a model carries signals, block by block. Without RUN, the model of
    --config/--set at initialisation (seeded by train.seed) reading random tokens; with RUN (a
    run directory or checkpoint), the trained model reading the first windows of its val text.

    Per block: the RMS of the residual stream entering and leaving it and their ratio, the norm
    of the loss's gradient reaching its input and its query and key weights, and the largest
    singular value of its input-output Jacobian (power iteration with jvp and vjp). Computed on
    the naive backend, whose function every backend computes.
    """
    from attnlm import propagation
    from attnlm.data import prepare_training
    from attnlm.runtime import resolve_device, set_threads

    if run and (config_path or overrides or vocab_size):
        raise InputError("inspect RUN reads the run's own model: --config, --set and "
                         "--vocab-size are for a new one")
    if run:
        loaded = api.load_run(run, device=device, threads=threads)
        model, seed, text = propagation.naive_copy(loaded.model), loaded.config.train.seed, "text"
        val = prepare_training(loaded.config, loaded.tokenizer)[1]["val"]
        tokens = propagation.text_windows(val.tokens, batch_size, model.cfg.block_size + 1)
    else:
        vocab_size = vocab_size or 256
        # --device and --threads as train.* values (checked as those are; --set ones win)
        cfg = config_mod.load_config(config_path, [f"train.device={device}",
                                                   f"train.threads={threads}", *overrides])
        set_threads(cfg.train.threads)
        seed, text = cfg.train.seed, "random"
        model = propagation.initial_model(cfg.model, vocab_size, seed,
                                          resolve_device(cfg.train.device))
        tokens = propagation.random_tokens(vocab_size, batch_size, cfg.model.block_size + 1, seed)
    report = {"model": f"{run} (trained)" if run else "at initialisation", "text": text,
              **propagation.propagation(model, tokens, iterations=iterations, seed=seed)}
    click.echo(json.dumps(report) if as_json else "\n".join(propagation.describe(report)))


@cli.command()
@runs_argument
@click.option("--format", "fmt", type=click.Choice(["markdown", "csv"]), default="markdown",
              show_default=True, help="Table format.")
def gather(runs, fmt):
    """One table of many runs (RUNS: run directories, folders of them at any depth, or quoted
    globs).

    A row per finished run: the config values that differ between the runs, the figures of its
    summary.json, and those of RUN/eval.json where present (save one with
    `attnlm eval RUN --json > RUN/eval.json`), as eval_*. A path holding no run, an unfinished
    run and one with a corrupt file are left out, with a warning.
    """
    from attnlm.gather import table, to_csv, to_markdown
    from attnlm.run import find_runs

    columns, rows = table(find_runs(runs, api.warn), api.warn)
    click.echo((to_csv if fmt == "csv" else to_markdown)(columns, rows), nl=False)


@cli.command()
@runs_argument
@click.option("--out", type=click.Path(dir_okay=False),
              help="PNG file to write [default: RUN/loss.png for one run; needed for several].")
@click.option("--log-y", is_flag=True, help="Logarithmic y axis.")
@click.option("--y", "y_axis", type=click.Choice(["loss", "bits-per-byte"]), default="loss",
              show_default=True,
              help="Loss in nats per token, or bits per byte of text (the loss times the run's "
                   "val tokens per byte, over ln 2): compares runs with different tokenizers.")
@click.option("--x", "x_axis", type=click.Choice(["step", "time"]), default="step",
              show_default=True, help="Steps, or wall seconds since each run started (data "
                                      "preparation, compilation and evaluations included).")
def plot(runs, out, log_y, y_axis, x_axis):
    """Train and val loss curves of one run or several overlaid, as a PNG (RUNS: run
    directories, folders of them, or quoted globs). Needs matplotlib: pip install 'attnlm[plot]'.
    """
    from attnlm.run import find_runs
    from attnlm.plots import loss_curves

    found = find_runs(runs, api.warn)
    if out is None and len(found) > 1:
        raise InputError(f"{len(found)} runs to overlay: say where the plot goes with --out FILE.png")
    out = out or str(found[0] / "loss.png")
    loss_curves(found, out, log_y, y_axis, x_axis)
    click.echo(f"wrote {out}")


@cli.command("export")
@click.argument("run")
@click.argument("out", type=click.Path(file_okay=False))
def export_command(run, out):
    """Write a trained model (RUN: run directory or checkpoint) as a Hugging Face transformers
    directory OUT: config.json, model.safetensors and the tokenizer, loaded by
    AutoModelForCausalLM.from_pretrained(OUT) without custom code. Only exact mappings: learned,
    sinusoidal and no positions as GPT-2, RoPE as GPT-NeoX, ALiBi without biases as MPT;
    RoPE + RMSNorm + SwiGLU (any n_kv_head) as Llama, with QK-norm as Qwen3, with windows as
    Mistral (every layer) or Ministral (some); what no architecture computes exactly is
    refused. OUT must be new or empty. Needs attnlm[hf]."""
    from attnlm.export import export_run

    arch = export_run(run, out)
    click.echo(f"wrote {out} ({arch})")


@cli.command("import")
@click.argument("source", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to create.")
@config_option
@set_option
def import_command(source, out, config_path, overrides):
    """Make a run from a local transformers GPT-2 directory SOURCE (model.safetensors, or
    pytorch_model.bin read as weights only; config.json; tokenizer files). Nothing is
    downloaded. The model and tokenizer come from SOURCE; --config and --set choose the rest
    (data.source and train.* for fine-tuning with `attnlm train --out OUT --resume`). Needs
    attnlm[hf]."""
    from attnlm.export import import_gpt2

    doc = config_mod.config_doc(config_path)
    import_gpt2(source, out, doc, overrides)
    click.echo(f"imported {source} into {out}")


def main():
    # SIGTERM as Ctrl-C for every command: what is being written is cleaned up, exit 130
    # (training installs its own handler for both).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cli(prog_name="attnlm")
