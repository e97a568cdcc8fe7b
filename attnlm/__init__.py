"""attnlm: train, sample and study small causal Transformer language models.

The Python API (documented in attnlm.api): load_config, train_run, load_run, generate,
eval_run and Run. `import attnlm` stays light: torch loads when a function first needs it.
"""

__version__ = "0.1.0"

API = ("load_config", "train_run", "load_run", "generate", "eval_run", "Run")
__all__ = [*API, "__version__"]


def __getattr__(name):  # the API, imported on first use
    if name in API:
        from attnlm import api

        return getattr(api, name)
    raise AttributeError(f"module 'attnlm' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *API})
