"""Several processes as torchrun launches them: one per device, one job, one run directory.

torchrun (or a cluster's wrapper around it) sets RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE; without them attnlm is one process, exactly as before. Every rank runs the same
training loop on its share of each step's batch and DDP (or FSDP2, `train.parallel=fsdp`)
averages the gradients: nccl on CUDA, gloo on the CPU. Rank 0 alone writes the run directory.
"""

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict)

from attnlm.errors import AttnlmError, InputError
from attnlm.runtime import usable_cores

# How long a rank waits for the others at a collective before the job fails (rank 0 may be
# training a tokenizer or encoding a large corpus while the others wait at a barrier).
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self):
        return self.rank == 0


def world():
    """This process's place in the job, from torchrun's environment (one process without it)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return World()
    return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                 int(env.get("LOCAL_WORLD_SIZE", 1)))


def join(w, device):
    """Join the job's process group (nccl on CUDA, gloo on the CPU); returns this rank's device."""
    if device.type == "cuda" and w.size > 1:
        device = torch.device("cuda", own_gpu(w))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if w.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return device


def own_gpu(w):
    """The index of this process's GPU: the node's LOCAL_RANK-th (torchrun shows every process
    all of them), or the one GPU a launcher left each process (CUDA_VISIBLE_DEVICES naming one,
    as SLURM's --gpus-per-task=1 does)."""
    gpus = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if gpus == 1 and visible and "," not in visible:
        return 0
    if max(w.local_rank + 1, w.local_size) > gpus:  # every process of the machine refuses
        raise InputError(f"this machine runs {w.local_size} processes of the job but shows "
                         f"{gpus} GPU(s); start at most one a GPU (torchrun --nproc_per_node="
                         f"{gpus}), or train on the CPU with --set train.device=cpu")
    return w.local_rank


def wait_for_all(w):
    """Return once every rank is here. A job that has trained leaves together: a rank that tore
    down its process group while rank 0 still wrote the last files aborted at exit now and then
    ("terminate called without an active exception", 2 exits in 25 of a 2-process CPU job)."""
    if w.size > 1:
        dist.barrier()


def leave():
    if dist.is_initialized():
        dist.destroy_process_group()


def threads_per_process(w):
    """CPU threads for train.threads=0: OMP_NUM_THREADS where set (torchrun sets 1), else the
    cores this process may use (usable_cores) shared among the job's processes on its machine."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, usable_cores() // w.local_size)


def wrap(model, w, parallel, device):
    """The model as the job trains it: itself in one process, else DDP or FSDP2 around it.
    FSDP2 shards each block on its own and the rest (the tied embedding and output head, one
    matrix) as the root unit."""
    if w.size == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # On the training device's type: without a mesh FSDP2 takes the machine's accelerator,
        # and would move a CPU job's parameters to a GPU the batches are not on.
        mesh = init_device_mesh(device.type, (w.size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(model, enabled):
    """Gradients are averaged across ranks only when `enabled` (the last micro-batch of a step)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield


def agree(values, w, device):
    """The sum over ranks of a few floats (each rank's loss, its stop flags), one collective."""
    if w.size == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    try:
        dist.all_reduce(tensor)
    except RuntimeError as err:
        if is_lost_peer(err):
            raise lost_peer(err) from None
        raise
    return tensor.tolist()


def is_lost_peer(err):
    """Whether a failed collective means another process of the job is gone."""
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL"))


@contextlib.contextmanager
def naming_a_lost_peer(w):
    """A collective that fails because another process of the job is gone, anywhere in a run
    (joining, wrapping the model, loading, leaving), as lost_peer's one line."""
    try:
        yield
    except RuntimeError as err:
        if w.size > 1 and is_lost_peer(err):
            raise lost_peer(err) from None
        raise


def lost_peer(err):
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip())  # without the source location
    reason = text.splitlines()[0].split(". ")[0][:120] if text else type(err).__name__
    return AttnlmError(f"another process of this job failed or was killed ({reason}); the last "
                       "checkpoint is kept, continue with --resume")


def from_main(w, produce):
    """Rank 0 calls produce() and every rank gets its result (JSON-able data), or the same
    AttnlmError, so that a refusal on rank 0 stops the whole job with one line."""
    if w.size == 1:
        return produce()
    box = [None]
    if w.main:
        try:
            box[0] = ("ok", produce())
        except AttnlmError as err:
            box[0] = ("error", (err.exit_code, str(err)))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "ok":
        return value
    error = AttnlmError(value[1])
    error.exit_code = value[0]
    raise shared(error)


def shared(error):
    """Mark an error that every rank of the job raises alike: each machine's first process
    (LOCAL_RANK 0) alone reports it, so a job of 16 processes on 2 machines prints it twice,
    once in each machine's log."""
    error.shared = True
    return error


@contextlib.contextmanager
def alike_on_every_rank():
    """Errors raised inside come alike on every rank: they follow from the job's arguments and
    from files every machine sees."""
    try:
        yield
    except AttnlmError as err:
        raise shared(err) from None


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model, optimizer):
    """(model, optimizer) state dicts as one process would hold them, without DDP's `module.` or
    torch.compile's `_orig_mod.` prefixes; every rank must call it (FSDP2 gathers the shards),
    rank 0 receives them."""
    model_state = get_model_state_dict(model, options=FULL)
    if not optimizer.state:  # before the first step, which get_optimizer_state_dict would take
        # with zero gradients to make a state (AdamW's step count would then start at 1)
        return model_state, optimizer.state_dict()
    return model_state, get_optimizer_state_dict(model, optimizer, options=FULL)


def load_full_state(model, optimizer, model_state, optimizer_state):
    """The inverse of full_state: every rank loads the whole state and keeps its share. The
    optimizer keeps the settings it was made with (the run's config, which a resume may change:
    weight decay, betas); the checkpoint gives it its state (moments, step counts)."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if all(isinstance(key, int) for key in optimizer_state["state"]):
        # saved before the first step, or by attnlm before torchrun jobs
        optimizer.load_state_dict(optimizer_state)
    else:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    for group, kept in zip(optimizer.param_groups, settings, strict=True):
        group.update(kept)
