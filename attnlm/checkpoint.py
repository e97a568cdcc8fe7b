"""Checkpoint files: written atomically with a checksum, loaded without executing anything and
verified, with a format version. What a checkpoint means for a run lives in attnlm.run.

Format 2 adds `sha256`, a digest of every value in the payload (tensor bytes included), so a
flipped bit anywhere is found at load. Format 1 files (no checksum) still load.
"""

import errno
import hashlib
import pickle

import torch

from attnlm.errors import AttnlmError
from attnlm.files import atomic_open, write_errors

FORMAT_VERSION = 2
READABLE = (1, 2)
NO_SPACE = ("unexpected pos", "file write failed")  # what torch's writer says on a full disk


def _digest(value, h):
    """Feed a payload into hash `h` in its own order (dicts keep insertion order)."""
    if isinstance(value, torch.Tensor):
        h.update(f"tensor {value.dtype} {tuple(value.shape)}".encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}".encode())
        for key, item in value.items():
            _digest(key, h)
            _digest(item, h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)}".encode())
        for item in value:
            _digest(item, h)
    else:
        h.update(f"{type(value).__name__} {value!r}".encode())


def checksum(payload):
    h = hashlib.sha256()
    _digest(payload, h)
    return h.hexdigest()


def non_finite(weights):
    """Names of floating-point tensors in a state dict holding NaN or infinity."""
    return [name for name, t in weights.items() if isinstance(t, torch.Tensor)
            and t.is_floating_point() and not torch.isfinite(t).all()]


def save(payload, path):
    """Write the payload, its format and checksum to `path`: whole or not at all. Refuses
    non-finite model weights, so a diverged model never replaces a good checkpoint."""
    if bad := non_finite(payload.get("model", {})):
        raise AttnlmError(f"the model's weights are not finite ({bad[0]}); not saved over "
                          f"{path}, which is kept")
    payload = {"format": FORMAT_VERSION, **payload}
    payload["sha256"] = checksum(payload)
    with write_errors(path, "; the last checkpoint is kept"):
        try:
            with atomic_open(path, "wb") as f:
                torch.save(payload, f)
        except RuntimeError as err:  # torch's writer reports a full disk so
            if any(s in str(err) for s in NO_SPACE):
                raise OSError(errno.ENOSPC, "") from None
            raise


def load(path):
    """A checkpoint's verified contents, with tensors on the CPU. weights_only: nothing in it can
    run code. Every failure is one line of our own (torch's text suggests unsafe loading)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise AttnlmError(f"cannot read {path}: {err.strerror or err}") from None
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # the pickle names a function or class to call
            raise AttnlmError(f"{path} holds Python objects that could run code when loaded; "
                              "refused (attnlm checkpoints hold tensors and plain values only)") from None
        raise AttnlmError(f"{path} is not a readable attnlm checkpoint (truncated or damaged)") from None
    except Exception:  # torch raises many types for truncated or foreign files
        raise AttnlmError(f"{path} is not a readable attnlm checkpoint (truncated, damaged or "
                          "not a checkpoint)") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise AttnlmError(f"{path} is not an attnlm checkpoint")
    if ckpt["format"] not in READABLE:
        raise AttnlmError(f"{path} has checkpoint format {ckpt['format']!r}; this attnlm reads "
                          f"formats {', '.join(map(str, READABLE))}")
    if ckpt["format"] >= 2:
        stored = ckpt.pop("sha256", None)
        if stored != checksum(ckpt):
            raise AttnlmError(f"{path} is corrupt: its contents do not match its checksum")
    if bad := non_finite(ckpt.get("model") if isinstance(ckpt.get("model"), dict) else {}):
        raise AttnlmError(f"{path} holds non-finite weights ({bad[0]}); refused")
    return ckpt
