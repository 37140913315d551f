"""The MambaVision mixer's inference path on a CPU: one C kernel in the tokens-first layout of its linears.

The mixer (``model.MambaVisionMixer``) computes, from ``xz = in_proj(x)`` of shape (B, L, 2D), a
depthwise conv + SiLU of both halves, ``x_proj`` and ``dt_proj`` (the step sizes, B and C) of the first
half, the selective scan, and the concatenation of the scan's output with the second half, which
``out_proj`` then reads. Written with PyTorch ops that is ~20 calls and 5 (B, C, L) <-> (B, L, C) copies
per block. Here it is one call, ``mixer_core(xz, conv_weight, x_proj_weight, dt_weight, dt_bias, A, D)``:
(B, L, 2D) -> (B, L, 2D), computed in float32 in one parallel region (conv + SiLU, then x_proj, then
dt_proj + scan), reading and writing bf16 directly where autocast's linears do.

It runs as a custom op (``torch.ops.mambavision.mixer_core``) that ``torch.compile`` keeps whole, with no
autograd: ``applies`` says when the mixer may take this path (CPU, no gradient wanted, the kernel built,
sizes within its limits). The op resolves the scan backend when it runs, like ``selective_scan``:
'cpu_kernel' is the fused kernel; another backend (``set_scan_backend``) runs the same steps as PyTorch ops
with that backend's scan, so compiled graphs follow the choice too. The kernel lives in
``csrc/selective_scan_cpu.c`` and is built with the scan's (``cpu_scan.load``).
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .cpu_scan import load
from .selective_scan import resolve_scan_backend, selective_scan

__all__ = ['applies', 'mixer_core']


@torch.compiler.assume_constant_result
def _kernel_limits() -> Optional[Tuple[int, int, int]]:
    """(widest conv, largest step-size rank, most states) the kernel takes, or None where it was not built."""
    library = load()
    return None if library is None else (library.mv_max_width(), library.mv_max_rank(), library.mv_max_state())


def applies(x: torch.Tensor, d_conv: int, dt_rank: int, d_state: int, *params: torch.Tensor) -> bool:
    """Whether the mixer may run on ``x`` (B, L, C) by the kernel now (the caller checks it is not tracing)."""
    if x.device.type != 'cpu' or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    limits = _kernel_limits()
    return limits is not None and d_conv % 2 == 1 and d_conv <= limits[0] and dt_rank <= limits[1] \
        and d_state <= limits[2]


def _float32_or_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous, in float32 unless it is bf16 (which the kernel reads as it is)."""
    return (x if x.dtype == torch.bfloat16 else x.float()).contiguous()


def _out_dtype(xz: torch.Tensor) -> torch.dtype:
    """``mixer_core``'s output dtype: bf16 for bf16 ``xz`` (what autocast's out_proj reads), else float32."""
    return torch.bfloat16 if xz.dtype == torch.bfloat16 else torch.float32


def _reference(xz, conv_weight, x_proj_weight, dt_weight, dt_bias, A, D, backend: str) -> torch.Tensor:
    """``mixer_core`` by PyTorch ops and ``backend``'s scan, float32 (B, L, 2D), contiguous as the kernel's."""
    xz, conv_weight = xz.float(), conv_weight.float()
    act = F.silu(F.conv1d(xz.transpose(1, 2), conv_weight, padding=conv_weight.shape[-1] // 2, groups=xz.shape[-1]))
    u, z = act.chunk(2, dim=1)  # (B, D, L) each
    rank, nstate = dt_weight.shape[1], A.shape[1]
    dt, b, c = F.linear(u.transpose(1, 2), x_proj_weight.float()).split([rank, nstate, nstate], dim=-1)
    delta = F.linear(dt, dt_weight.float(), dt_bias.float()).transpose(1, 2)
    y = selective_scan(u, delta, A.float(), b.transpose(1, 2), c.transpose(1, 2), D.float(), dt_bias.float(), True,
                       backend=backend)
    return torch.cat([y, z], dim=1).transpose(1, 2).contiguous()


@torch.library.custom_op('mambavision::mixer_core', mutates_args=())
def mixer_core(xz: torch.Tensor, conv_weight: torch.Tensor, x_proj_weight: torch.Tensor, dt_weight: torch.Tensor,
               dt_bias: torch.Tensor, A: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """[selective_scan(u, delta, A, B, C, D, dt_bias, softplus), z] along channels, from xz = [x, z] (B, L, 2D).

    u, z = silu(depthwise conv1d along L of x, z) with conv_weight (2D, 1, k), k odd, 'same' zero padding;
    [dt, B, C] = u x_proj_weight^T, x_proj_weight (R + 2N, D); delta = dt_proj(dt), dt_weight (D, R) and
    dt_bias (D,), whose bias enters twice (again as the scan's delta bias); A (D, N), D (D,).
    Returns (B, L, 2D) in bf16 for bf16 ``xz``, else float32.
    """
    out_dtype = _out_dtype(xz)
    backend = resolve_scan_backend('cpu')
    if backend != 'cpu_kernel':
        return _reference(xz, conv_weight, x_proj_weight, dt_weight, dt_bias, A, D, backend).to(out_dtype)
    xz, x_proj_weight = _float32_or_bf16(xz), _float32_or_bf16(x_proj_weight)
    conv_weight, dt_weight, dt_bias, A, D = (
        t.float().contiguous() for t in (conv_weight, dt_weight, dt_bias, A, D))
    batch, length, channels = xz.shape[0], xz.shape[1], xz.shape[2] // 2
    rank, nstate = dt_weight.shape[1], A.shape[1]
    library = load()
    scratch = torch.empty(library.mv_mixer_scratch(batch, length, channels, rank, nstate))
    out = torch.empty(xz.shape, dtype=out_dtype)
    with _profiled('mixer_core kernel'):  # the op itself is not always recorded
        library.mv_mixer_fwd(
            xz.data_ptr(), xz.dtype == torch.bfloat16, conv_weight.data_ptr(), x_proj_weight.data_ptr(),
            x_proj_weight.dtype == torch.bfloat16, dt_weight.data_ptr(), dt_bias.data_ptr(), A.data_ptr(),
            D.data_ptr(), scratch.data_ptr(), out.data_ptr(), out_dtype == torch.bfloat16, batch, length, channels,
            conv_weight.shape[-1], rank, nstate, torch.get_num_threads())
    return out


@mixer_core.register_fake
def _core_fake(xz, conv_weight, x_proj_weight, dt_weight, dt_bias, A, D):
    return xz.new_empty(xz.shape, dtype=_out_dtype(xz))


def _profiled(name: str):
    """``record_function(name)`` while the profiler runs; nothing (no op call) otherwise."""
    return torch.profiler.record_function(name) if torch.autograd.profiler._is_profiler_enabled \
        else contextlib.nullcontext()
