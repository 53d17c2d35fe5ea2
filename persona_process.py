"""The process a command runs in: rank zero of a launch, one line to the user, the device, tearing down.

Every layer prints its notes to the user through `say` (rank zero only, under `torchrun` too), checks a `--device`
with one rule (`check_device_name` without torch while parsing, `check_device` for what this machine has before a
model loads), and a distributed run ends through `end_process_groups`.
"""

from __future__ import annotations

import os
import re
import sys

from persona_errors import UsageError

# Device types torch.device knows, and those a model runs on here; whether one is present is `check_device`'s job.
TORCH_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "meta", "xla", "hpu", "mtia", "ipu", "lazy", "vulkan", "fpga")
RUNNABLE_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def is_rank_zero() -> bool:
    """Whether this is the main process of a launch (or the only process)."""
    return os.environ.get("RANK", "0") in ("0", "")


def say(message: str) -> None:
    """One line on stderr, from the main process only (shown whatever the log level)."""
    if is_rank_zero():
        print(message, file=sys.stderr, flush=True)


def check_device_name(device: str | None, flag: str = "--device") -> None:
    """A `UsageError` for a device string that is not a device a model runs on (checked without importing torch).

    >>> check_device_name("cuda:1")
    >>> check_device_name("meta")
    Traceback (most recent call last):
    ...
    persona_errors.UsageError: --device meta: not a device to run a model on here; use cpu, cuda, cuda:1, mps or xpu.
    """
    if device is None:
        return
    match = re.fullmatch(r"([a-z_]+)(:\d+)?", device)
    if match is None or match.group(1) not in TORCH_DEVICE_TYPES:
        raise UsageError(f"{flag} {device!r} is not a device; use cpu, cuda, cuda:1, mps, ...")
    if match.group(1) not in RUNNABLE_DEVICE_TYPES:
        raise UsageError(f"{flag} {device}: not a device to run a model on here; use cpu, cuda, cuda:1, mps or xpu.")


def check_device(device: str | None, flag: str = "--device") -> None:
    """`check_device_name`, then a `UsageError` for an accelerator this machine does not have (imports torch)."""
    check_device_name(device, flag)
    if device is None:
        return
    import torch

    parsed = torch.device(device)
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA"
        raise UsageError(f"{flag} {device}: this machine has {found}; use --device cpu (or leave --device out).")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} mps: MPS is not available here; use --device cpu.")
    if parsed.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UsageError(f"{flag} {device}: this machine has no XPU; use --device cpu (or leave --device out).")


def resolve_device(device: str | None):
    """The `torch.device` to run on: `device`, else cuda when available, else cpu."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def release_deepspeed(trainer) -> None:
    """`engine.destroy()` at the end of a DeepSpeed run: the engine's hooks would otherwise keep it, and the process
    groups it holds, alive past the run (see `end_process_groups`)."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        trainer.accelerator.free_memory()


def end_process_groups(synchronize: bool = True) -> None:
    """Tear down the process groups of a distributed run so that no communication thread outlives the interpreter.

    gloo joins a group's threads only when the last reference to the group goes, and `destroy_process_group` drops
    only torch's own: DeepSpeed's module-level groups and every object still holding a group (an engine whose hooks
    were not removed, ZeRO-3's parameters) keep the threads running into the interpreter's exit, where a peer closing
    its sockets can abort the process ("terminate called without an active exception"). With `synchronize`, the ranks
    first wait for each other, so that none closes its connections while another still uses them. (A real ZeRO-3
    run still leaves its groups' threads alive after this: some holder of its engine is not found yet; the barrier is
    what keeps the ranks' exits together there.)
    """
    import gc

    dist = sys.modules.get("torch.distributed")  # never imported: no process group to tear down
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize:
        dist.barrier()
    zero3 = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if isinstance(getattr(zero3, "FWD_MODULE_STACK", None), list):
        # ZeRO-3 pushes each engine's model on this module-level stack and never pops it: the model keeps its engine
        # (through the hooks), the optimizer and the partitioned parameters alive, each holding a process group.
        zero3.FWD_MODULE_STACK.clear()
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # torch's, plus the references DeepSpeed keeps in deepspeed.utils.groups
    else:
        dist.destroy_process_group()
    gc.collect()  # the groups referenced only from reference cycles go now, and their threads with them
