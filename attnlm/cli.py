"""Command line: attnlm train | generate | eval. Parses, builds the config, calls the library and
maps expected errors to one line and an exit code (0 ok, 1 runtime, 2 usage/input, 130 interrupt)."""

import json
import traceback
from pathlib import Path

import click

from attnlm import config as config_mod
from attnlm.errors import AttnlmError, InputError


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AttnlmError as err:
            self._fail(ctx, f"error: {err}", err.exit_code)
        except KeyboardInterrupt:
            self._fail(ctx, "interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as err:  # a bug: say so in one line unless --debug asks for the trace
            self._fail(ctx, f"internal error: {type(err).__name__}: {err} (rerun with --debug "
                            "for the traceback)", 1)

    @staticmethod
    def _fail(ctx, message, code):
        if ctx.obj and ctx.obj.get("debug"):
            traceback.print_exc()
        click.echo(message, err=True)
        ctx.exit(code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="attnlm")
@click.pass_context
def cli(ctx, debug):
    """Train, sample and evaluate small causal Transformer language models."""
    ctx.obj = {"debug": debug}


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="YAML config file (see configs/).")
set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override one config value; repeatable. Wins over --config.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines.")


def _run_name(config_path, overrides):
    stem = Path(config_path).stem if config_path else "default"
    parts = [stem] + [o.replace("=", "-").replace("/", "_").split(".", 1)[-1] for o in overrides]
    return "runs/" + "_".join(parts)


@cli.command()
@config_option
@set_option
@click.option("--out", type=click.Path(file_okay=False),
              help="Run directory [default: runs/ + the config name and overrides].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@json_option
@quiet_option
def train(config_path, overrides, out, resume, as_json, quiet):
    """Train a model; writes config, tokenizer, checkpoint and metrics into the run directory.

    Ctrl-C stops after the current step, saves a checkpoint and exits 130; --resume continues.
    """
    from attnlm import train as train_mod

    out = out or _run_name(config_path, overrides)
    doc = config_mod.read_yaml(config_path) if config_path else None
    if resume:
        cfg = train_mod.resume_config(out, doc, overrides)
    else:
        cfg = config_mod.build_config(doc, overrides)
    summary = train_mod.train(cfg, out, resume=resume, quiet=quiet)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"trained {summary['steps']} steps into {out}: val loss {summary['val_loss']:.4f}, "
                   f"{summary['tokens_per_s'] or 0:,.0f} tokens/s")


def _prompt_text(prompt, prompt_file):
    if prompt is not None and prompt_file:
        raise InputError("give --prompt or --prompt-file, not both")
    if prompt_file:
        try:
            return Path(prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read prompt file {prompt_file}: {err}") from None
    return prompt or ""


@cli.command()
@click.argument("run")
@click.option("--prompt", help="Text to continue. Empty: start from a newline.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="Read the prompt from a file.")
@click.option("--max-new-tokens", type=int, help="Tokens to generate [default: from the run's config].")
@click.option("--temperature", type=float, help="Softmax temperature; 0 is greedy.")
@click.option("--top-k", type=int, help="Sample among the k likeliest tokens; 0 disables.")
@click.option("--num-samples", type=int, help="Independent samples to draw.")
@click.option("--seed", type=int, help="Random seed: same seed, same text.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def generate(run, prompt, prompt_file, max_new_tokens, temperature, top_k, num_samples, seed, device):
    """Continue a prompt with a trained model (RUN: a run directory or checkpoint file)."""
    import torch

    from attnlm.checkpoint import load_model
    from attnlm.runtime import resolve_device
    from attnlm.sampling import check_controls, generate as generate_tokens

    model, tokenizer, cfg, _ = load_model(run, resolve_device(device))
    s = cfg.sample
    pick = lambda value, default: default if value is None else value
    max_new_tokens, temperature = pick(max_new_tokens, s.max_new_tokens), pick(temperature, s.temperature)
    top_k, num_samples, seed = pick(top_k, s.top_k), pick(num_samples, s.num_samples), pick(seed, s.seed)
    check_controls(temperature, top_k)
    if max_new_tokens < 0 or num_samples < 1:
        raise InputError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    text = _prompt_text(prompt, prompt_file)
    ids = tokenizer.encode(text or "\n")
    device = next(model.parameters()).device
    idx = torch.tensor([ids] * num_samples, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    steps = list(generate_tokens(model, idx, max_new_tokens, temperature, top_k, generator))
    new = torch.cat(steps, dim=1).tolist() if steps else [[] for _ in range(num_samples)]
    for i, row in enumerate(new):
        if i:
            click.echo("\n---")
        click.echo(text + tokenizer.decode(row))


@cli.command("eval")
@click.argument("run")
@click.option("--source", help="Evaluate the whole of this source instead of the run's val split.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Windows per batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@json_option
def evaluate(run, source, batch_size, device, as_json):
    """Loss, perplexity and bits per byte of a trained model (RUN: run directory or checkpoint)."""
    from attnlm.checkpoint import load_model
    from attnlm.data import prepare_source, prepare_training
    from attnlm.evaluate import report, split_loss
    from attnlm.runtime import resolve_device

    if batch_size < 1:
        raise InputError("--batch-size must be positive")
    model, tokenizer, cfg, _ = load_model(run, resolve_device(device))
    if source:
        split, name = prepare_source(source, tokenizer, cfg.data.cache_dir), source
    else:
        split, name = prepare_training(cfg, tokenizer)[1]["val"], f"{cfg.data.source} (val)"
    if len(split) < 2:
        raise InputError(f"{name} has too little text to evaluate ({len(split)} tokens)")
    device = next(model.parameters()).device
    loss = split_loss(model, split, cfg.model.block_size, batch_size, device)
    result = {"source": name, **report(loss, split)}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{name}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
                   f"bits/byte {result['bits_per_byte']:.4f} over {result['tokens']:,} tokens")


def main():
    cli(prog_name="attnlm")


