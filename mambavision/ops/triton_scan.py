"""Triton selective scan (Mamba-1 recurrence), forward and backward.

The CUDA backend used when mamba-ssm's compiled kernel is absent. Semantics and shapes
are those of ``torch_scan.selective_scan_ref``:

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
One program per (batch, block of ``BLOCK_D`` channels, segment). It walks its tokens in
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
segment and summed on the host.

Long sequences with few programs (a detection model's 12,544-token window at a small batch
would leave most SMs idle) run as a two-pass scan over segments of whole chunks: a summary
pass gives every segment's decay product and end state from a zero start, in parallel; a
short sequential pass over segment boundaries (``_segment_carry_kernel``) chains them into
each segment's entering state; the output pass then scans every segment from that state, in
parallel. The backward does the same with the adjoint, from the last segment backwards. The
segment count aims at ``PROGRAMS_PER_SM`` programs per SM (``seg_len`` forces a length).

Every launch runs inside ``torch.cuda.device_of(u)``: Triton launches on the current device
and stream, not on the tensors' device. A NaN step size stays NaN (as in every other backend).

The ``import triton`` is guarded: without a working Triton this module still imports,
``HAS_TRITON`` is False and ``selective_scan_triton`` raises ``RuntimeError`` when called. Kernels need CUDA
tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was
imported (that is how the tests run them).
"""
import functools
from typing import Callable, NamedTuple, Optional

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

__all__ = ['selective_scan_triton', 'triton_scan_fwd', 'triton_scan_bwd', 'kernel_config', 'HAS_TRITON']

HAS_TRITON = triton is not None

# Launch configuration (chosen by compiling for sm_90 and reading ptxas register and
# spill counts; not yet timed on a GPU). A scanned tile is BLOCK_D x BLOCK_L x N_pad
# float32 elements; the backward keeps about twice as many tiles live, so it takes
# half the channels per program.
FWD_MAX_BLOCK_D = 16
BWD_MAX_BLOCK_D = 8
TILE_ELEMS = 4096  # FWD_MAX_BLOCK_D * BLOCK_L * N_pad
NUM_WARPS = 8
# Segments (the two-pass scan): a pass whose (batch, channel block) programs are too few to fill the
# GPU splits long sequences into segments of at least MIN_SEGMENT_TOKENS, aiming at PROGRAMS_PER_SM
# programs per SM. Not yet timed on a GPU.
PROGRAMS_PER_SM = 2
MIN_SEGMENT_TOKENS = 512
DEFAULT_SM_COUNT = 132  # what the interpreter assumes (an H100 / H200)
CARRY_BLOCK_ROWS = 16  # (batch, channel) rows per program of the boundary pass


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
            e = tl.exp(tl.minimum(z, 20.0, propagate_nan=tl.PropagateNan.ALL))  # NaN stays NaN, as in torch
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
    def _last_column(x, offs_l, BLOCK_L: tl.constexpr):
        """x[:, BLOCK_L - 1, :] of a (BLOCK_D, BLOCK_L, BLOCK_N) tile."""
        return tl.sum(tl.where(offs_l[None, :, None] == BLOCK_L - 1, x, 0.0), axis=1)

    @triton.jit
    def _first_column(x, offs_l):
        """x[:, 0, :] of a (BLOCK_D, BLOCK_L, BLOCK_N) tile."""
        return tl.sum(tl.where(offs_l[None, :, None] == 0, x, 0.0), axis=1)

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, dl_ptr, a_ptr, b_ptr, c_ptr, skip_ptr, bias_ptr, y_ptr, st_ptr, carry_ptr, prod_ptr, end_ptr,
        n_ch, seqlen, n_state, seg_chunks,
        su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sa_d, sa_n,
        sb_b, sb_n, sb_l, sc_b, sc_n, sc_l, sy_b, sy_d, sy_l,
        HAS_SKIP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        SAVE_STATES: tl.constexpr, SUMMARY: tl.constexpr, HAS_CARRY: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Grid (B, cdiv(D, BLOCK_D), n_seg); segment s is chunks [s * seg_chunks, (s + 1) * seg_chunks).

        Output pass (SUMMARY False): starts from the segment's entering state, carry (B, D, n_seg, N)
        float32 if HAS_CARRY, else zero; writes y (B, D, L) and, if SAVE_STATES, the chunk-start
        states st (B, D, n_chunks, N) float32. Summary pass: from a zero state, writes the segment's
        decay product and end state, prod and end (B, D, n_seg, N) float32; no y. All contiguous.
        """
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        pid_s = tl.program_id(2)
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
        seg_row = ((pid_b * n_ch + offs_d[:, None]) * tl.num_programs(2) + pid_s) * n_state + offs_n[None, :]
        first = pid_s * seg_chunks

        if HAS_CARRY:
            h = tl.load(carry_ptr + seg_row, mask=mask_dn, other=0.0)
        else:
            h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        prod = tl.full((BLOCK_D, BLOCK_N), 1.0, tl.float32)
        for chunk in range(first, tl.minimum(first + seg_chunks, n_chunks)):
            if SAVE_STATES:
                tl.store(st_row + chunk * n_state, h, mask=mask_dn)
            offs_t = chunk * BLOCK_L + offs_l
            mask_t = offs_t < seqlen
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_tn = mask_t[:, None] & mask_n[None, :]
            u = tl.load(u_row + offs_t[None, :] * su_l, mask=mask_dt, other=0.0).to(tl.float32)
            dl = tl.load(dl_row + offs_t[None, :] * sdl_l, mask=mask_dt, other=0.0).to(tl.float32)
            bt = tl.load(b_col + offs_t[:, None] * sb_l, mask=mask_tn, other=0.0).to(tl.float32)  # (L, N)
            dt = _step_size(dl, bias[:, None], SOFTPLUS)                             # (D, L)
            decay = tl.exp(dt[:, :, None] * a[:, None, :])                          # (D, L, N)
            decay = tl.where(mask_t[None, :, None], decay, 1.0)  # padding steps: identity map
            inp = (dt * u)[:, :, None] * bt[None, :, :]                              # 0 where padded
            acc_a, acc_b = tl.associative_scan((decay, inp), 1, _compose)
            hs = acc_a * h[:, None, :] + acc_b                                       # h_t
            if SUMMARY:
                prod *= _last_column(acc_a, offs_l, BLOCK_L)
            else:
                ct = tl.load(c_col + offs_t[:, None] * sc_l, mask=mask_tn, other=0.0).to(tl.float32)
                y = tl.sum(hs * ct[None, :, :], axis=2)
                if HAS_SKIP:
                    y += skip[:, None] * u
                tl.store(y_row + offs_t[None, :] * sy_l, y.to(y_ptr.dtype.element_ty), mask=mask_dt)
            # padding steps are identities, so the last column holds the state after the chunk
            h = _last_column(hs, offs_l, BLOCK_L)
        if SUMMARY:
            tl.store(prod_ptr + seg_row, prod, mask=mask_dn)
            tl.store(end_ptr + seg_row, h, mask=mask_dn)

    @triton.jit
    def _segment_carry_kernel(prod_ptr, end_ptr, carry_ptr, n_rows, n_seg, n_state,
                              REVERSE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        """Grid (cdiv(B * D, BLOCK_R),): the pass over segment boundaries, sequential over segments.

        prod, end, carry: (B * D, n_seg, N) float32 contiguous. Writes carry[s], the carry entering
        segment s, then carries on with prod[s] * carry + end[s]: from segment 0 upwards, or
        with REVERSE from the last segment downwards (the backward's adjoint).
        """
        offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_n = tl.arange(0, BLOCK_N)
        mask = (offs_r[:, None] < n_rows) & (offs_n[None, :] < n_state)
        row = offs_r[:, None] * n_seg * n_state + offs_n[None, :]
        carry = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        for i in range(0, n_seg):
            seg = n_seg - 1 - i if REVERSE else i
            at = row + seg * n_state
            tl.store(carry_ptr + at, carry, mask=mask)
            carry = tl.load(prod_ptr + at, mask=mask, other=0.0) * carry + tl.load(end_ptr + at, mask=mask, other=0.0)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, dl_ptr, a_ptr, b_ptr, c_ptr, skip_ptr, bias_ptr, gy_ptr, st_ptr, carry_ptr, prod_ptr, end_ptr,
        du_ptr, ddl_ptr, da_ptr, db_ptr, dc_ptr, dskip_ptr, dbias_ptr,
        n_ch, seqlen, n_state, seg_chunks,
        su_b, su_d, su_l, sdl_b, sdl_d, sdl_l, sa_d, sa_n,
        sb_b, sb_n, sb_l, sc_b, sc_n, sc_l, sg_b, sg_d, sg_l,
        HAS_SKIP: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        SUMMARY: tl.constexpr, HAS_CARRY: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Grid (B, cdiv(D, BLOCK_D), n_seg), segments as in the forward; BLOCK_L must be the forward's.

        Gradient pass (SUMMARY False): reads dy (B, D, L), the chunk-start states and, if
        HAS_CARRY, the adjoint entering the segment from the right, carry (B, D, n_seg, N): g at
        the next segment's first token. Writes du, ddelta (B, D, L) contiguous in the input
        dtypes; adds dB, dC into zeroed float32 (B, N, L) buffers; writes per-(batch, segment)
        float32 partials dA (B * n_seg, D, N), dD (B * n_seg, D), ddelta_bias (B * n_seg, D).
        Summary pass: the adjoint alone from a zero carry; writes the segment's decay product and
        g at its first token, prod and end (B, D, n_seg, N). All contiguous.
        """
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        pid_s = tl.program_id(2)
        n_seg = tl.num_programs(2)
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
        seg_row = ((pid_b * n_ch + offs_d[:, None]) * n_seg + pid_s) * n_state + offs_n[None, :]
        first = pid_s * seg_chunks
        n_own = tl.minimum(first + seg_chunks, n_chunks) - first

        if HAS_CARRY:  # adjoint of the state at the next chunk's start
            g_next = tl.load(carry_ptr + seg_row, mask=mask_dn, other=0.0)
        else:
            g_next = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        prod = tl.full((BLOCK_D, BLOCK_N), 1.0, tl.float32)
        da_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        dskip_acc = tl.zeros((BLOCK_D,), tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
        for rev in range(0, n_own):
            chunk = first + n_own - 1 - rev
            offs_t = chunk * BLOCK_L + offs_l
            mask_t = offs_t < seqlen
            mask_dt = mask_d[:, None] & mask_t[None, :]
            mask_tn = mask_t[:, None] & mask_n[None, :]
            gy = tl.load(gy_row + offs_t[None, :] * sg_l, mask=mask_dt, other=0.0).to(tl.float32)
            ct = tl.load(c_col + offs_t[:, None] * sc_l, mask=mask_tn, other=0.0).to(tl.float32)

            if not SUMMARY:
                u = tl.load(u_row + offs_t[None, :] * su_l, mask=mask_dt, other=0.0).to(tl.float32)
                dl = tl.load(dl_row + offs_t[None, :] * sdl_l, mask=mask_dt, other=0.0).to(tl.float32)
                bt = tl.load(b_col + offs_t[:, None] * sb_l, mask=mask_tn, other=0.0).to(tl.float32)  # (L, N)
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
            g_next = _first_column(g, offs_l)
            if SUMMARY:
                prod *= _first_column(acc_p, offs_l)
            else:
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

        if SUMMARY:
            tl.store(prod_ptr + seg_row, prod, mask=mask_dn)
            tl.store(end_ptr + seg_row, g_next, mask=mask_dn)
        else:
            part = (pid_b * n_seg + pid_s) * n_ch + offs_d  # this (batch, segment)'s partials
            tl.store(da_ptr + part[:, None] * n_state + offs_n[None, :], da_acc, mask=mask_dn)
            if HAS_SKIP:
                tl.store(dskip_ptr + part, dskip_acc, mask=mask_d)
            if HAS_BIAS:
                tl.store(dbias_ptr + part, dbias_acc, mask=mask_d)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


class _Config(NamedTuple):
    """Launch configuration: tile sizes (powers of two) and chunks of ``block_l`` tokens per segment."""
    block_d_fwd: int
    block_d_bwd: int
    block_l: int
    block_n: int
    seg_chunks_fwd: int
    seg_chunks_bwd: int


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != 'cuda':  # the interpreter: stand in an H100 / H200
        return DEFAULT_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _segment_chunks(programs: int, n_chunks: int, block_l: int, seg_len, device: torch.device) -> int:
    """Chunks per segment of a pass with ``programs`` (batch, channel block) programs: all of them
    (one segment), unless the sequence is long and the programs too few to fill the GPU."""
    if seg_len is not None:
        return seg_len // block_l
    wanted = -(-PROGRAMS_PER_SM * _sm_count(device) // programs)
    n_seg = min(wanted, n_chunks * block_l // MIN_SEGMENT_TOKENS)
    return n_chunks if n_seg < 2 else -(-n_chunks // n_seg)


def _launch_config(batch: int, n_ch: int, seqlen: int, n_state: int, device: torch.device,
                   block_d=None, block_l=None, seg_len=None) -> _Config:
    """``block_d`` / ``block_l`` override the tile defaults (``block_d`` for both passes), ``seg_len``
    the segment length in tokens (a multiple of the token tile)."""
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
    block_l = int(block_l)
    if seg_len is not None and (int(seg_len) < 1 or int(seg_len) % block_l):
        raise ValueError(f'seg_len must be a positive multiple of the token tile {block_l}, got {seg_len}')
    n_chunks = -(-seqlen // block_l)
    return _Config(bd_fwd, bd_bwd, block_l, block_n,
                   _segment_chunks(batch * -(-n_ch // bd_fwd), n_chunks, block_l, seg_len, device),
                   _segment_chunks(batch * -(-n_ch // bd_bwd), n_chunks, block_l, seg_len, device))


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


def _carry_in(summary_pass: Callable, shape: tuple, block_n: int, device: torch.device, reverse: bool):
    """The carry entering every segment, (B, D, n_seg, N) float32: ``summary_pass(prod, end)`` writes
    each segment's decay product and end value, then the boundary pass chains them (``reverse``: from
    the last segment, for the backward's adjoint)."""
    prod, end, carry = torch.empty((3, *shape), dtype=torch.float32, device=device).unbind(0)
    summary_pass(prod, end)
    rows = shape[0] * shape[1]
    _segment_carry_kernel[(triton.cdiv(rows, CARRY_BLOCK_ROWS),)](
        prod, end, carry, rows, shape[2], shape[3], REVERSE=reverse, BLOCK_R=CARRY_BLOCK_ROWS, BLOCK_N=block_n)
    return carry


def kernel_config(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True) -> str:
    """What Triton compiles and launches for a scan of these tensors: device, dtypes, options, tile
    sizes and whether the passes run in segments (one line)."""
    cfg = _launch_config(u.shape[0], u.shape[1], u.shape[2], A.shape[1], u.device)
    n_chunks = -(-u.shape[2] // cfg.block_l)
    dtypes = '/'.join(str(t.dtype).replace('torch.', '') for t in (u, delta, A, B, C))
    return (f'{u.device}, u/delta/A/B/C {dtypes}, D {D is not None}, delta_bias {delta_bias is not None}, '
            f'softplus {bool(delta_softplus)}, tiles {cfg.block_d_fwd}/{cfg.block_d_bwd} x {cfg.block_l} x '
            f'{cfg.block_n}, segmented {cfg.seg_chunks_fwd < n_chunks}/{cfg.seg_chunks_bwd < n_chunks}')


def _kernel_args(u, delta, A, B, C, D, delta_bias, delta_softplus, y, states, cfg, block_d: int, seg_chunks: int):
    """What both kernels take first: the tensors (an absent D / delta_bias passed as A, unread), the sizes and
    strides (``y``: the forward's output or the backward's dy, (B, D, L)), and the compile-time flags."""
    n_ch, seqlen = u.shape[1:]
    inputs = (u, delta, A, B, C, A if D is None else D, A if delta_bias is None else delta_bias, y, states)
    sizes = (n_ch, seqlen, A.shape[1], seg_chunks,
             *u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *y.stride())
    flags = dict(HAS_SKIP=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
                 BLOCK_D=block_d, BLOCK_L=cfg.block_l, BLOCK_N=cfg.block_n, num_warps=NUM_WARPS)
    return inputs, sizes, flags


def triton_scan_fwd(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, block_d=None, block_l=None,
                    seg_len=None, save=False):
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
    cfg = _launch_config(batch, n_ch, seqlen, n_state, u.device, block_d, block_l, seg_len)
    n_chunks = triton.cdiv(seqlen, cfg.block_l)
    n_seg = triton.cdiv(n_chunks, cfg.seg_chunks_fwd)
    y = torch.empty((batch, n_ch, seqlen), dtype=u.dtype, device=u.device)
    states = torch.empty((batch, n_ch, n_chunks, n_state) if save else (1,),
                         dtype=torch.float32, device=u.device)
    kernel = _scan_fwd_kernel[(batch, triton.cdiv(n_ch, cfg.block_d_fwd), n_seg)]
    inputs, sizes, flags = _kernel_args(
        u, delta, A, B, C, D, delta_bias, delta_softplus, y, states, cfg, cfg.block_d_fwd, cfg.seg_chunks_fwd)
    with torch.cuda.device_of(u):  # Triton launches on the current device and stream, not the tensors'
        carry = None
        if n_seg > 1:
            carry = _carry_in(
                lambda prod, end: kernel(*inputs, states, prod, end, *sizes, SAVE_STATES=False, SUMMARY=True,
                                         HAS_CARRY=False, **flags),
                (batch, n_ch, n_seg, n_state), cfg.block_n, u.device, reverse=False)
        kernel(*inputs, states if carry is None else carry, states, states, *sizes, SAVE_STATES=save,
               SUMMARY=False, HAS_CARRY=carry is not None, **flags)
    return y, states if save else None


def triton_scan_bwd(gy, states, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, block_d=None,
                    block_l=None, seg_len=None):
    """Backward kernel from dy (B, D, L) and the forward's ``states`` (same ``block_d`` / ``block_l``):
    (du, ddelta, dA, dB, dC, dD, ddelta_bias) in the inputs' dtypes, None for an absent D / delta_bias."""
    batch, n_ch, seqlen = u.shape
    n_state = A.shape[1]
    cfg = _launch_config(batch, n_ch, seqlen, n_state, u.device, block_d, block_l, seg_len)
    n_seg = triton.cdiv(triton.cdiv(seqlen, cfg.block_l), cfg.seg_chunks_bwd)
    dev = u.device
    f32 = torch.float32
    du = torch.empty((batch, n_ch, seqlen), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, n_ch, seqlen), dtype=delta.dtype, device=dev)
    dA = torch.empty((batch * n_seg, n_ch, n_state), dtype=f32, device=dev)
    dB = torch.zeros((batch, n_state, seqlen), dtype=f32, device=dev)
    dC = torch.zeros((batch, n_state, seqlen), dtype=f32, device=dev)
    dD = torch.empty((batch * n_seg, n_ch), dtype=f32, device=dev) if D is not None else dA
    dbias = torch.empty((batch * n_seg, n_ch), dtype=f32, device=dev) if delta_bias is not None else dA
    kernel = _scan_bwd_kernel[(batch, triton.cdiv(n_ch, cfg.block_d_bwd), n_seg)]
    inputs, sizes, flags = _kernel_args(
        u, delta, A, B, C, D, delta_bias, delta_softplus, gy, states, cfg, cfg.block_d_bwd, cfg.seg_chunks_bwd)
    outputs = (du, ddelta, dA, dB, dC, dD, dbias)
    with torch.cuda.device_of(u):  # Triton launches on the current device and stream, not the tensors'
        carry = None
        if n_seg > 1:
            carry = _carry_in(
                lambda prod, end: kernel(*inputs, states, prod, end, *outputs, *sizes, SUMMARY=True,
                                         HAS_CARRY=False, **flags),
                (batch, n_ch, n_seg, n_state), cfg.block_n, dev, reverse=True)
        kernel(*inputs, states if carry is None else carry, states, states, *outputs, *sizes, SUMMARY=False,
               HAS_CARRY=carry is not None, **flags)
    return (
        du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        dD.sum(0).to(D.dtype) if D is not None else None,
        dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None,
    )


class _SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper around the forward and backward kernels (shapes: module doc)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus, block_d, block_l, seg_len, save):
        y, states = triton_scan_fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, block_d, block_l, seg_len,
                                    save)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
            ctx.config = (bool(delta_softplus), block_d, block_l, seg_len)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
        grads = triton_scan_bwd(gy, states, u, delta, A, B, C, D, delta_bias, *ctx.config)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None, None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, *,
                          block_d=None, block_l=None, seg_len=None):
    """Selective scan with the Triton kernels; differentiable in every tensor argument.

    u, delta (B, D, L); A (D, N); B, C (B, N, L); D, delta_bias (D,) or None. Returns y
    (B, D, L) in u's dtype, computed in float32. ``block_d`` / ``block_l`` (powers of two)
    override the channel and token tile sizes, ``seg_len`` (a multiple of the token tile) the
    segment length of the two-pass scan. Raises RuntimeError without Triton.
    """
    if not HAS_TRITON:
        raise RuntimeError(f'selective_scan_triton needs triton, which failed to import: {_TRITON_IMPORT_ERROR!r}')
    # forward-only calls (no_grad, inference) skip saving the chunk states
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, delta_bias))
    with torch.autocast(u.device.type, enabled=False):
        return _SelectiveScanTriton.apply(u, delta, A, B, C, D, delta_bias, delta_softplus, block_d, block_l,
                                          seg_len, save)
