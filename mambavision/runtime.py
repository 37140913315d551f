"""Where and how a job runs: the device, mixed precision, the torchrun process group, and the
one-line form of an error that the commands and the trainers print."""
import contextlib
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ['UserError', 'one_line', 'check_output_folder', 'resolve_device', 'amp_dtype', 'amp_autocast',
           'init_distributed']


class UserError(ValueError):
    """An expected failure caused by the caller's input (unknown name, missing file, bad option).

    Its message is complete in one line; the command line prints it without a traceback.
    """


def one_line(e: BaseException) -> str:
    """The first non-empty line of ``e``'s message (its type name when it has none)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def check_output_folder(path: str, flag: str = '--output'):
    """A one-line ``UserError`` when ``path``, a folder to write into (created if needed), is an existing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag} {path} is a file; expected a folder (created when it does not exist)')


def resolve_device(name: Optional[str]) -> torch.device:
    """The device ``name`` ('cpu', 'cuda', 'cuda:1'), or CUDA when available and ``name`` is None.

    Asking for CUDA where PyTorch sees none is a ``UserError`` that names the way out.
    """
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {name}: no CUDA device is available to this PyTorch (use --device cpu)')
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected 'cpu', 'cuda' or 'cuda:N'") from None


def amp_dtype(amp: Optional[str]) -> Optional[torch.dtype]:
    """The torch dtype of a mixed-precision choice ('bf16' or 'fp16'), or None."""
    return {None: None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]


def amp_autocast(device_type: str, amp: Optional[str]):
    """Autocast to bf16 or fp16 on ``device_type``, or a context that does nothing when ``amp`` is None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=amp_dtype(amp))


def init_distributed(device: Optional[str]) -> Tuple[torch.device, int, int]:
    """Join torchrun's process group when there is one (NCCL on GPUs, gloo on CPUs): (device, rank, world size).

    Each rank takes the GPU of its ``LOCAL_RANK``; one process without torchrun gets rank 0 of 1. A process group
    that already exists (set up by the caller) is used as it is.
    """
    device = str(resolve_device(device))
    if dist.is_available() and dist.is_initialized():
        if device == 'cuda':
            device = f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}'
        return torch.device(device), dist.get_rank(), dist.get_world_size()
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
        return torch.device(device), dist.get_rank(), dist.get_world_size()
    return torch.device(device), 0, 1
