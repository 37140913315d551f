"""The MambaVision mixer's inference path on a CPU: two C kernels in the tokens-first layout of its linears.

The mixer (``model.MambaVisionMixer``) computes, from ``xz = in_proj(x)`` of shape (B, L, 2D),
a depthwise conv + SiLU of both halves, the step-size projection of the first half and the
selective scan, and concatenates the scan's output with the second half. Written with PyTorch
ops, that is ~20 calls and 5 (B, C, L) <-> (B, L, C) copies per block. Here it is:

* ``mixer_conv_silu(xz, weight)``: silu(depthwise conv along L) of (B, L, C), 'same' padding;
* ``x_proj`` (an ordinary linear, left to oneDNN) on the first half;
* ``mixer_ssm(act, proj, w_dt, dt_bias, A, D)``: the step-size projection ``dt_proj``, the scan and
  the concatenation with the second half, in one pass: (B, L, 2D) -> (B, L, 2D).

Both run as custom ops (``torch.ops.mambavision.mixer_conv_silu`` / ``mixer_ssm``) that
``torch.compile`` keeps whole, in float32 whatever autocast says (they cast their inputs), with
no autograd: ``applies`` says when the mixer may take this path (CPU, no gradient wanted, the
kernels built, sizes within their limits). ``mixer_ssm`` resolves the scan backend when it runs,
like ``selective_scan``: 'cpu_kernel' is the fused kernel, another backend (``set_scan_backend``)
runs ``dt_proj`` and that backend's scan instead, so compiled graphs follow the choice too.
The kernels live in ``csrc/selective_scan_cpu.c`` and are built with the scan's (``cpu_scan.load``).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .cpu_scan import load
from .selective_scan import resolve_scan_backend, selective_scan

__all__ = ['applies', 'mixer_conv_silu', 'mixer_ssm']


@torch.compiler.assume_constant_result
def _kernel_limits() -> Optional[Tuple[int, int, int]]:
    """(widest conv, largest step-size rank, most states) the kernels take, or None where they were not built."""
    library = load()
    return None if library is None else (library.mv_max_width(), library.mv_max_rank(), library.mv_max_state())


def applies(x: torch.Tensor, d_conv: int, dt_rank: int, d_state: int, *params: torch.Tensor) -> bool:
    """Whether the mixer may run on ``x`` (B, L, C) by these kernels now (the caller checks it is not tracing)."""
    if x.device.type != 'cpu' or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    limits = _kernel_limits()
    return limits is not None and d_conv % 2 == 1 and d_conv <= limits[0] and dt_rank <= limits[1] \
        and d_state <= limits[2]


def _float32_or_bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous, in float32 unless it is bf16 (which the kernels read as it is)."""
    return (x if x.dtype == torch.bfloat16 else x.float()).contiguous()


@torch.library.custom_op('mambavision::mixer_conv_silu', mutates_args=())
def mixer_conv_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(depthwise conv1d of x along L), 'same' zero padding: x (B, L, C), weight (C, 1, k), k odd.

    Returns float32 (B, L, C).
    """
    x, weight = _float32_or_bf16(x), weight.float().contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    batch, length, channels = x.shape
    with torch.profiler.record_function('mixer_conv_silu kernel'):  # the op itself is not always recorded
        load().mv_mixer_conv_silu(x.data_ptr(), x.dtype == torch.bfloat16, weight.data_ptr(), out.data_ptr(),
                                  batch, length, channels, weight.shape[-1], torch.get_num_threads())
    return out


@mixer_conv_silu.register_fake
def _conv_silu_fake(x, weight):
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op('mambavision::mixer_ssm', mutates_args=())
def mixer_ssm(act: torch.Tensor, proj: torch.Tensor, w_dt: torch.Tensor, dt_bias: torch.Tensor, A: torch.Tensor,
              D: torch.Tensor) -> torch.Tensor:
    """[selective_scan(u, delta, A, B, C, D, dt_bias, softplus), z] along channels, float32 (B, L, 2D).

    act (B, L, 2D) = [u, z]; proj (B, L, R + 2N) = [dt, B, C] (x_proj's output); w_dt (D, R), dt_bias (D,):
    dt_proj, whose bias enters twice (delta = dt_proj(dt), then delta_bias = dt_bias in the scan);
    A (D, N), D (D,).
    """
    act, proj = act.float().contiguous(), _float32_or_bf16(proj)
    w_dt, dt_bias, A, D = (t.float().contiguous() for t in (w_dt, dt_bias, A, D))
    backend = resolve_scan_backend('cpu')
    if backend != 'cpu_kernel':
        u, z = act.chunk(2, dim=-1)
        rank, nstate = w_dt.shape[1], A.shape[1]
        dt, b, c = (t.transpose(1, 2) for t in proj.float().split([rank, nstate, nstate], dim=-1))
        dt = F.linear(dt.transpose(1, 2), w_dt, dt_bias).transpose(1, 2)
        y = selective_scan(u.transpose(1, 2), dt, A, b, c, D, dt_bias, True, backend=backend)
        return torch.cat([y.transpose(1, 2), z], dim=-1)
    out = torch.empty_like(act)
    batch, length, channels = act.shape[0], act.shape[1], act.shape[2] // 2
    with torch.profiler.record_function('mixer_ssm kernel'):
        load().mv_mixer_ssm_fwd(
            act.data_ptr(), proj.data_ptr(), proj.dtype == torch.bfloat16, proj.shape[2], w_dt.data_ptr(),
            dt_bias.data_ptr(), A.data_ptr(), D.data_ptr(), out.data_ptr(), batch, length, channels,
            w_dt.shape[1], A.shape[1], torch.get_num_threads())
    return out


@mixer_ssm.register_fake
def _ssm_fake(act, proj, w_dt, dt_bias, A, D):
    return act.new_empty(act.shape, dtype=torch.float32)
