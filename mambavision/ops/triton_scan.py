"""Triton selective scan (Mamba-1 recurrence), forward and backward.

The CUDA backend used when mamba-ssm's compiled kernel is absent. Semantics and shapes
are those of ``selective_scan.selective_scan_ref``:

    u, delta:   (B, D, L)   fp32 / bf16 / fp16
    A:          (D, N)
    B, C:       (B, N, L)
    D:          (D,)        optional skip
    delta_bias: (D,)        optional
    returns y:  (B, D, L)   in the dtype of u

    dt  = softplus(delta + delta_bias)          (or delta + delta_bias)
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_0 = 0
    y_t = sum_n h_t[n] * C_t[n] + D * u_t

Design
------
One program per (batch, block of ``BLOCK_D`` channels). It walks the sequence in
chunks of ``BLOCK_L`` tokens and keeps the state of its channels, a float32
``(BLOCK_D, N)`` tile, in registers between chunks. Inside a chunk the step maps
``h -> a_t * h + b_t`` (``a_t = exp(dt_t A)``, ``b_t = dt_t B_t u_t``) are composed
with ``tl.associative_scan`` over the token axis of a ``(BLOCK_D, BLOCK_L, N)`` tile,
then applied to the carried state. Softplus, ``delta_bias`` and the ``D * u`` skip
are computed in the kernel; all arithmetic is float32 whatever the input dtype.

The forward saves the state at the start of every chunk, ``(B, D, n_chunks, N)``
float32. The backward walks the chunks in reverse order: it recomputes the states of
a chunk from its saved start state (same scan as the forward), runs the adjoint
recurrence ``g_t = exp(dt_{t+1} A) g_{t+1} + dy_t C_t`` as a reverse scan carrying
``g`` between chunks, and forms every gradient from ``h_t``, ``g_t`` and the inputs.
``g_t * exp(dt_t A) * h_{t-1}`` is taken as ``g_t * (h_t - b_t)``, so no division by
a decay is needed. Gradients of the per-batch tensors ``B`` and ``C`` are reductions
over channels and are accumulated with float32 atomics (so they are not bitwise
deterministic); those of ``A``, ``D`` and ``delta_bias`` are written per batch and
summed over the batch on the host.

The ``import triton`` is guarded: without a working Triton this module still imports,
``HAS_TRITON`` is False and ``selective_scan_triton`` raises ``RuntimeError`` when called. Kernels need CUDA
tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was
imported (that is how the tests run them).
"""
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

try:  # a missing or broken Triton must not break importing this module
    import triton
    import triton.language as tl
    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = exc

__all__ = ['selective_scan_triton', 'triton_scan_fwd', 'triton_scan_bwd', 'HAS_TRITON']

HAS_TRITON = triton is not None

# Launch configuration (chosen by compiling for sm_90 and reading ptxas register and
# spill counts; not yet timed on a GPU). A scanned tile is BLOCK_D x BLOCK_L x N_pad
# float32 elements; the backward keeps about twice as many tiles live, so it takes
# half the channels per program.
FWD_MAX_BLOCK_D = 16
BWD_MAX_BLOCK_D = 8
TILE_ELEMS = 4096  # FWD_MAX_BLOCK_D * BLOCK_L * N_pad
NUM_WARPS = 8


if HAS_TRITON:

    @triton.jit
    def _compose(a_first, b_first, a_then, b_then):
        """Compose affine maps h -> a*h + b: apply (a_first, b_first), then (a_then, b_then)."""
        return a_first * a_then, a_then * b_first + b_then

    @triton.jit
    def _step_size(raw, bias, SOFTPLUS: tl.constexpr):
        """dt = softplus(raw + bias) (torch's threshold 20), or raw + bias; float32."""
        z = raw + bias
        if SOFTPLUS:
            e = tl.exp(tl.minimum(z, 20.0))
            w = 1.0 + e
            # log1p(e), accurate for tiny e: log(w) * e / (w - 1), and e itself once w rounds to 1
            soft = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
            z = tl.where(z > 20.0, z, soft)
        return z

    @triton.jit
    def _channel_block(pid_d, n_ch, n_state, a_ptr, sa_d, sa_n, bias_ptr, skip_ptr,
                       HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's channel block: offsets and masks of channels and states, and its float32
        A (BLOCK_D, BLOCK_N), delta bias and D (BLOCK_D,), zeros where absent."""
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < n_ch
        mask_n = offs_n < n_state
        a = tl.load(a_ptr + offs_d[:, None] * sa_d + offs_n[None, :] * sa_n,
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        bias = tl.zeros((BLOCK_D,), tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        skip = tl.zeros((BLOCK_D,), tl.float32)
        if HAS_SKIP:
            skip = tl.load(skip_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        return offs_d, offs_n, mask_d, mask_n, a, bias, skip

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, dl_ptr, a_ptr, b_ptr, c_ptr, skip_ptr, bias_ptr, y_ptr, st_ptr,
        n_ch, seqlen, n_state,
        su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sa_d, sa_n,
        sb_b, sb_n, sb_l, sc_b, sc_n, sc_l, sy_b, sy_d, sy_l,
        HAS_SKIP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        SAVE_STATES: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Grid (B, cdiv(D, BLOCK_D)). Writes y (B, D, L) and, if SAVE_STATES, the chunk-start
        states st (B, D, n_chunks, N) float32, contiguous."""
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d, offs_n, mask_d, mask_n, a, bias, skip = _channel_block(
            pid_d, n_ch, n_state, a_ptr, sa_d, sa_n, bias_ptr, skip_ptr, HAS_BIAS, HAS_SKIP, BLOCK_D, BLOCK_N)
        offs_l = tl.arange(0, BLOCK_L)
        mask_dn = mask_d[:, None] & mask_n[None, :]

        u_row = u_ptr + pid_b * su_b + offs_d[:, None] * su_d
        dl_row = dl_ptr + pid_b * sdl_b + offs_d[:, None] * sdl_d
        y_row = y_ptr + pid_b * sy_b + offs_d[:, None] * sy_d
        b_col = b_ptr + pid_b * sb_b + offs_n[None, :] * sb_n
        c_col = c_ptr + pid_b * sc_b + offs_n[None, :] * sc_n
        n_chunks = tl.cdiv(seqlen, BLOCK_L)
        st_row = st_ptr + ((pid_b * n_ch + offs_d[:, None]) * n_chunks) * n_state + offs_n[None, :]

        h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        for chunk in range(0, n_chunks):
            if SAVE_STATES:
                tl.store(st_row + chunk * n_state, h, mask=mask_dn)
            offs_t = chunk * BLOCK_L + offs_l
            mask_t = offs_t < seqlen
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_tn = mask_t[:, None] & mask_n[None, :]
            u = tl.load(u_row + offs_t[None, :] * su_l, mask=mask_dt, other=0.0).to(tl.float32)
            dl = tl.load(dl_row + offs_t[None, :] * sdl_l, mask=mask_dt, other=0.0).to(tl.float32)
            bt = tl.load(b_col + offs_t[:, None] * sb_l, mask=mask_tn, other=0.0).to(tl.float32)  # (L, N)
            ct = tl.load(c_col + offs_t[:, None] * sc_l, mask=mask_tn, other=0.0).to(tl.float32)
            dt = _step_size(dl, bias[:, None], SOFTPLUS)                             # (D, L)
            decay = tl.exp(dt[:, :, None] * a[:, None, :])                          # (D, L, N)
            decay = tl.where(mask_t[None, :, None], decay, 1.0)  # padding steps: identity map
            inp = (dt * u)[:, :, None] * bt[None, :, :]                              # 0 where padded
            acc_a, acc_b = tl.associative_scan((decay, inp), 1, _compose)
            hs = acc_a * h[:, None, :] + acc_b                                       # h_t
            y = tl.sum(hs * ct[None, :, :], axis=2)
            if HAS_SKIP:
                y += skip[:, None] * u
            tl.store(y_row + offs_t[None, :] * sy_l, y.to(y_ptr.dtype.element_ty), mask=mask_dt)
            # padding steps are identities, so the last column holds the state after the chunk
            h = tl.sum(tl.where(offs_l[None, :, None] == BLOCK_L - 1, hs, 0.0), axis=1)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, dl_ptr, a_ptr, b_ptr, c_ptr, skip_ptr, bias_ptr, gy_ptr, st_ptr,
        du_ptr, ddl_ptr, da_ptr, db_ptr, dc_ptr, dskip_ptr, dbias_ptr,
        n_ch, seqlen, n_state,
        su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sa_d, sa_n,
        sb_b, sb_n, sb_l, sc_b, sc_n, sc_l, sg_b, sg_d, sg_l,
        HAS_SKIP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Grid (B, cdiv(D, BLOCK_D)); BLOCK_L must be the forward's. Reads dy (B, D, L) and the
        chunk-start states. Writes du, ddelta (B, D, L) contiguous in the input dtypes; adds dB,
        dC into zeroed float32 (B, N, L) buffers; writes per-batch float32 partials
        dA (B, D, N), dD (B, D), ddelta_bias (B, D), all contiguous."""
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        offs_d, offs_n, mask_d, mask_n, a, bias, skip = _channel_block(
            pid_d, n_ch, n_state, a_ptr, sa_d, sa_n, bias_ptr, skip_ptr, HAS_BIAS, HAS_SKIP, BLOCK_D, BLOCK_N)
        offs_l = tl.arange(0, BLOCK_L)
        mask_dn = mask_d[:, None] & mask_n[None, :]

        u_row = u_ptr + pid_b * su_b + offs_d[:, None] * su_d
        dl_row = dl_ptr + pid_b * sdl_b + offs_d[:, None] * sdl_d
        gy_row = gy_ptr + pid_b * sg_b + offs_d[:, None] * sg_d
        out_row = (pid_b * n_ch + offs_d[:, None]) * seqlen  # du / ddelta, contiguous (B, D, L)
        b_col = b_ptr + pid_b * sb_b + offs_n[None, :] * sb_n
        c_col = c_ptr + pid_b * sc_b + offs_n[None, :] * sc_n
        dbc_col = (pid_b * n_state + offs_n[None, :]) * seqlen  # dB / dC, contiguous (B, N, L)
        n_chunks = tl.cdiv(seqlen, BLOCK_L)
        st_row = st_ptr + ((pid_b * n_ch + offs_d[:, None]) * n_chunks) * n_state + offs_n[None, :]

        g_next = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # adjoint of the state at the next chunk's start
        da_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        dskip_acc = tl.zeros((BLOCK_D,), tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
        for rev in range(0, n_chunks):
            chunk = n_chunks - 1 - rev
            offs_t = chunk * BLOCK_L + offs_l
            mask_t = offs_t < seqlen
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_tn = mask_t[:, None] & mask_n[None, :]
            u = tl.load(u_row + offs_t[None, :] * su_l, mask=mask_dt, other=0.0).to(tl.float32)
            dl = tl.load(dl_row + offs_t[None, :] * sdl_l, mask=mask_dt, other=0.0).to(tl.float32)
            gy = tl.load(gy_row + offs_t[None, :] * sg_l, mask=mask_dt, other=0.0).to(tl.float32)
            bt = tl.load(b_col + offs_t[:, None] * sb_l, mask=mask_tn, other=0.0).to(tl.float32)  # (L, N)
            ct = tl.load(c_col + offs_t[:, None] * sc_l, mask=mask_tn, other=0.0).to(tl.float32)
            dt = _step_size(dl, bias[:, None], SOFTPLUS)

            # states of this chunk, from its saved start state
            decay = tl.exp(dt[:, :, None] * a[:, None, :])
            decay = tl.where(mask_t[None, :, None], decay, 1.0)
            inp = (dt * u)[:, :, None] * bt[None, :, :]
            acc_a, acc_b = tl.associative_scan((decay, inp), 1, _compose)
            h0 = tl.load(st_row + chunk * n_state, mask=mask_dn, other=0.0)
            hs = acc_a * h0[:, None, :] + acc_b

            # adjoint g_t = dL/dh_t = decay_{t+1} * g_{t+1} + dy_t * C_t, run backwards in time
            offs_t1 = offs_t + 1
            mask_t1 = offs_t1 < seqlen
            dl1 = tl.load(dl_row + offs_t1[None, :] * sdl_l, mask=mask_d[:, None] & mask_t1[None, :],
                          other=0.0).to(tl.float32)
            dt1 = _step_size(dl1, bias[:, None], SOFTPLUS)
            decay1 = tl.exp(dt1[:, :, None] * a[:, None, :])
            decay1 = tl.where(mask_t1[None, :, None], decay1, 1.0)
            src = gy[:, :, None] * ct[None, :, :]
            acc_p, acc_q = tl.associative_scan((decay1, src), 1, _compose, reverse=True)
            g = acc_p * g_next[:, None, :] + acc_q               # zero on padding steps
            g_next = tl.sum(tl.where(offs_l[None, :, None] == 0, g, 0.0), axis=1)

            w = g * (hs - inp)                                   # g_t * decay_t * h_{t-1}
            gb = tl.sum(g * bt[None, :, :], axis=2)              # (D, L)
            ddt = tl.sum(w * a[:, None, :], axis=2) + gb * u
            du = gb * dt
            if HAS_SKIP:
                du += skip[:, None] * gy
                dskip_acc += tl.sum(gy * u, axis=1)
            if SOFTPLUS:
                ddl = ddt * tl.sigmoid(dl + bias[:, None])
            else:
                ddl = ddt
            ddl = tl.where(mask_dt, ddl, 0.0)
            dbias_acc += tl.sum(ddl, axis=1)
            da_acc += tl.sum(w * dt[:, :, None], axis=1)
            tl.store(du_ptr + out_row + offs_t[None, :], du.to(du_ptr.dtype.element_ty), mask=mask_dt)
            tl.store(ddl_ptr + out_row + offs_t[None, :], ddl.to(ddl_ptr.dtype.element_ty), mask=mask_dt)

            db = tl.sum(g * (dt * u)[:, :, None], axis=0)       # (L, N), this block's channels
            dc = tl.sum(hs * gy[:, :, None], axis=0)
            tl.atomic_add(db_ptr + dbc_col + offs_t[:, None], db, mask=mask_tn, sem='relaxed')
            tl.atomic_add(dc_ptr + dbc_col + offs_t[:, None], dc, mask=mask_tn, sem='relaxed')

        tl.store(da_ptr + (pid_b * n_ch + offs_d[:, None]) * n_state + offs_n[None, :], da_acc, mask=mask_dn)
        if HAS_SKIP:
            tl.store(dskip_ptr + pid_b * n_ch + offs_d, dskip_acc, mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_ptr + pid_b * n_ch + offs_d, dbias_acc, mask=mask_d)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _launch_config(n_ch: int, seqlen: int, n_state: int, block_d=None, block_l=None):
    """(BLOCK_D forward, BLOCK_D backward, BLOCK_L, BLOCK_N), all powers of two.

    ``block_d`` / ``block_l`` override the defaults (``block_d`` for both passes).
    """
    block_n = max(2, _next_pow2(n_state))
    for name, v in (('block_d', block_d), ('block_l', block_l)):
        if v is not None and (int(v) < 1 or int(v) & (int(v) - 1)):
            raise ValueError(f'{name} must be a power of two, got {v}')
    ch = max(2, _next_pow2(n_ch))
    bd_fwd = min(FWD_MAX_BLOCK_D, ch) if block_d is None else int(block_d)
    bd_bwd = min(BWD_MAX_BLOCK_D, ch) if block_d is None else int(block_d)
    if block_l is None:
        block_l = max(8, TILE_ELEMS // (FWD_MAX_BLOCK_D * block_n))
        block_l = min(block_l, max(2, _next_pow2(seqlen)))
    return bd_fwd, bd_bwd, int(block_l), block_n


def _check_device(*tensors):
    from triton.runtime.interpreter import InterpretedFunction
    interpreted = isinstance(_scan_fwd_kernel, InterpretedFunction)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise RuntimeError(f'selective_scan_triton: all tensors must be on one device, got {devices}')
    device = devices.pop()
    if device.type != 'cuda' and not interpreted:
        raise RuntimeError(
            f'selective_scan_triton needs CUDA tensors (got {device.type}); '
            'set TRITON_INTERPRET=1 before importing triton to run it on the CPU')


def triton_scan_fwd(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, block_d=None, block_l=None,
                    save=False):
    """Forward kernel: y (B, D, L) in u's dtype, and with ``save`` the chunk-start states
    (B, D, n_chunks, N) float32 that ``triton_scan_bwd`` needs (else None)."""
    batch, n_ch, seqlen = u.shape
    n_state = A.shape[1]
    if delta.shape != u.shape or A.shape != (n_ch, n_state) or B.shape != (batch, n_state, seqlen) \
            or C.shape != B.shape:
        raise ValueError(
            'selective_scan_triton: expected u, delta (B, D, L), A (D, N), B, C (B, N, L); got '
            f'{tuple(u.shape)}, {tuple(delta.shape)}, {tuple(A.shape)}, {tuple(B.shape)}, {tuple(C.shape)}')
    for name, t in (('D', D), ('delta_bias', delta_bias)):
        if t is not None and t.shape != (n_ch,):
            raise ValueError(f'selective_scan_triton: {name} must have shape ({n_ch},), got {tuple(t.shape)}')
    _check_device(u, delta, A, B, C, D, delta_bias)
    bd, _, bl, bn = _launch_config(n_ch, seqlen, n_state, block_d, block_l)
    n_chunks = triton.cdiv(seqlen, bl)
    y = torch.empty((batch, n_ch, seqlen), dtype=u.dtype, device=u.device)
    states = torch.empty((batch, n_ch, n_chunks, n_state) if save else (1,),
                         dtype=torch.float32, device=u.device)
    grid = (batch, triton.cdiv(n_ch, bd))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, A if D is None else D, A if delta_bias is None else delta_bias, y, states,
        n_ch, seqlen, n_state,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *y.stride(),
        HAS_SKIP=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        SAVE_STATES=save, BLOCK_D=bd, BLOCK_L=bl, BLOCK_N=bn, num_warps=NUM_WARPS)
    return y, states if save else None


def triton_scan_bwd(gy, states, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, block_d=None,
                    block_l=None):
    """Backward kernel from dy (B, D, L) and the forward's ``states`` (same ``block_d`` / ``block_l``):
    (du, ddelta, dA, dB, dC, dD, ddelta_bias) in the inputs' dtypes, None for an absent D / delta_bias."""
    batch, n_ch, seqlen = u.shape
    n_state = A.shape[1]
    _, bd, bl, bn = _launch_config(n_ch, seqlen, n_state, block_d, block_l)
    dev = u.device
    f32 = torch.float32
    du = torch.empty((batch, n_ch, seqlen), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, n_ch, seqlen), dtype=delta.dtype, device=dev)
    dA = torch.empty((batch, n_ch, n_state), dtype=f32, device=dev)
    dB = torch.zeros((batch, n_state, seqlen), dtype=f32, device=dev)
    dC = torch.zeros((batch, n_state, seqlen), dtype=f32, device=dev)
    dD = torch.empty((batch, n_ch), dtype=f32, device=dev) if D is not None else dA
    dbias = torch.empty((batch, n_ch), dtype=f32, device=dev) if delta_bias is not None else dA
    grid = (batch, triton.cdiv(n_ch, bd))
    _scan_bwd_kernel[grid](
        u, delta, A, B, C, A if D is None else D, A if delta_bias is None else delta_bias, gy, states,
        du, ddelta, dA, dB, dC, dD, dbias,
        n_ch, seqlen, n_state,
        *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *gy.stride(),
        HAS_SKIP=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        BLOCK_D=bd, BLOCK_L=bl, BLOCK_N=bn, num_warps=NUM_WARPS)
    return (
        du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        dD.sum(0).to(D.dtype) if D is not None else None,
        dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
    )


class _SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper around the forward and backward kernels (shapes: module doc)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, block_d, block_l, save):
        y, states = triton_scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, block_d, block_l, save)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
            ctx.config = (bool(delta_softplus), block_d, block_l)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
        grads = triton_scan_bwd(gy, states, u, delta, A, B, C, D, delta_bias, *ctx.config)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, *,
                          block_d=None, block_l=None):
    """Selective scan with the Triton kernels; differentiable in every tensor argument.

    u, delta (B, D, L); A (D, N); B, C (B, N, L); D, delta_bias (D,) or None. Returns y
    (B, D, L) in u's dtype, computed in float32. ``block_d`` / ``block_l`` (powers of two)
    override the channel and token tile sizes. Raises RuntimeError without Triton.
    """
    if not HAS_TRITON:
        raise RuntimeError(f'selective_scan_triton needs triton, which failed to import: {_TRITON_IMPORT_ERROR!r}')
    # forward-only calls (no_grad, inference) skip saving the chunk states
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, delta_bias))
    with torch.autocast(u.device.type, enabled=False):
        return _SelectiveScanTriton.apply(u, delta, A, B, C, D, delta_bias, delta_softplus, block_d, block_l, save)
