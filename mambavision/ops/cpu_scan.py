"""Our CPU selective-scan kernels (forward and backward), built on first use with the machine's C compiler.

``csrc/selective_scan_cpu.c`` is plain C with GCC/Clang vector extensions and OpenMP: one
work item per sequence and group of 16 channels, whose states stay in registers for the
whole sweep, with vectorised exp and log; softplus, ``delta_bias`` and the ``D * u`` skip
are done in the kernel. The backward redoes the forward sweep keeping every state of its
group, then runs the adjoint recurrence in reverse. No PyTorch headers are needed, so it
compiles in about a second.

Build: ``$CC``, else ``cc``, ``gcc`` or ``clang`` from ``PATH``, with ``-O3 -march=native
-fopenmp`` (and fused multiply-adds), falling back to fewer flags when the compiler refuses one (Apple's clang has
no OpenMP: the kernel then runs on one thread). The library goes to
``$MAMBAVISION_CACHE`` (default ``~/.cache/mambavision``), named by a hash of the source,
compiler, flags and CPU, so a shared home directory never serves a library built for
another CPU; it is written under a temporary name and renamed, so concurrent processes
(DDP ranks) do not race. Linked against ``libgomp.so.1``, it runs in the OpenMP runtime
that PyTorch has already loaded, with ``torch.get_num_threads()`` threads.

Without a working compiler ``load()`` returns None and the ``torch`` backend runs instead.
"""
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import threading
from pathlib import Path
from typing import List, Optional

import torch

from .torch_scan import selective_scan_torch, vjp_backward

__all__ = ['load', 'selective_scan_cpu', 'selective_scan_cpu_backward']

SOURCE = Path(__file__).parent / 'csrc' / 'selective_scan_cpu.c'
CACHE_ENV_VAR = 'MAMBAVISION_CACHE'
_LANES = 16  # channels per work item, LANES in the C source
_FLAG_SETS = (('-O3', '-march=native', '-fopenmp'), ('-O3', '-march=native'), ('-O3', '-fopenmp'), ('-O3',))

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_tried = False
build_error: Optional[str] = None  # why ``load()`` returned None, in one line


def _compiler() -> Optional[List[str]]:
    """The C compiler command: ``$CC`` (which may carry arguments, e.g. 'ccache gcc'), else the first on PATH."""
    if os.environ.get('CC'):
        return shlex.split(os.environ['CC'])
    found = shutil.which('cc') or shutil.which('gcc') or shutil.which('clang')
    return [found] if found else None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the architecture and, on Linux, the CPU's feature flags."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith(('flags', 'Features'))), '')
    except OSError:
        flags = platform.processor()
    return f'{platform.machine()} {flags}'


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / '.cache' / 'mambavision')


def _build(compiler: List[str]) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the library with the first flag set that works.

    Raises ``RuntimeError`` with the compiler's first error line when no flag set works.
    """
    source = SOURCE.read_bytes()
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    error = 'no flag set worked'
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b'\0'.join(x.encode() for x in [*compiler, *flags, _cpu_id()]) + source)
        target = cache / f'selective_scan_cpu-{key.hexdigest()[:16]}.so'
        if not target.exists():
            partial = target.with_name(f'.{target.name}.{os.getpid()}')
            try:
                result = subprocess.run(
                    [*compiler, *flags, '-std=c99', '-ffp-contract=fast', '-shared', '-fPIC', str(SOURCE), '-o',
                     str(partial)],
                    capture_output=True, text=True, timeout=120)
                if result.returncode == 0:
                    os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            if result.returncode != 0:
                error = next((line for line in result.stderr.splitlines() if 'error' in line), error)
                continue
        try:
            library = ctypes.CDLL(str(target))
        except OSError as e:
            error = str(e)
            continue
        pointer, long = ctypes.c_void_p, ctypes.c_long
        # lists written out with * (not joined with +), so that mypy keeps their item types
        library.mv_selective_scan_fwd.argtypes = [*[pointer] * 7, ctypes.c_int, pointer, *[long] * 4, ctypes.c_int]
        library.mv_selective_scan_fwd.restype = None
        library.mv_selective_scan_bwd.argtypes = [
            *[pointer] * 7, ctypes.c_int, *[pointer] * 8, *[long] * 4, ctypes.c_int]
        library.mv_selective_scan_bwd.restype = ctypes.c_int
        library.mv_max_state.restype = ctypes.c_int
        library.mv_mixer_scratch.argtypes = [long] * 5
        library.mv_mixer_scratch.restype = long
        library.mv_mixer_fwd.argtypes = [
            pointer, ctypes.c_int, *[pointer] * 2, ctypes.c_int, *[pointer] * 6, ctypes.c_int, *[long] * 6,
            ctypes.c_int]
        library.mv_mixer_fwd.restype = None
        library.mv_max_rank.restype = library.mv_max_width.restype = ctypes.c_int
        return library
    raise RuntimeError(f'{" ".join(compiler)} could not build it: {error}')


def load() -> Optional[ctypes.CDLL]:
    """The kernel library, built on the first call; None when it cannot be built (tried once: see ``build_error``)."""
    global _library, _tried, build_error
    with _lock:
        if not _tried:
            _tried = True
            compiler = _compiler()
            try:
                if compiler is None:
                    raise RuntimeError('no C compiler found (set $CC, or install gcc or clang)')
                _library = _build(compiler)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # also: unwritable cache, hung compiler
                _library, build_error = None, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return _library


def _library_for(nstate: int) -> Optional[ctypes.CDLL]:
    """The library, or None when ``nstate`` exceeds the states a kernel holds (``mv_max_state()``, 64)."""
    library = load()
    if library is None:
        raise RuntimeError(f'the CPU scan kernel could not be built ({build_error}); use the torch backend')
    return library if nstate <= library.mv_max_state() else None


def _tokens_first(*tensors):
    """float32 (B, L, .) contiguous copies of (B, ., L) tensors, as the kernels take them."""
    return [t.float().transpose(1, 2).contiguous() for t in tensors]


def _vectors(*tensors):
    return [None if t is None else t.float().contiguous() for t in tensors]


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def selective_scan_cpu(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """float32 scan of CPU tensors by the kernel; shapes as ``torch_scan``'s (u, delta (B, D, L) -> y (B, D, L)).

    More than 64 states per channel run the ``torch`` backend.
    """
    library = _library_for(A.shape[1])
    if library is None:
        return selective_scan_torch(u, delta, A, B, C, D, delta_bias, delta_softplus)
    batch, channels, length = u.shape
    u_, delta_, B_, C_ = _tokens_first(u, delta, B, C)
    A, D, delta_bias = _vectors(A, D, delta_bias)
    y = u_.new_empty(batch, length, channels)
    library.mv_selective_scan_fwd(
        _ptr(u_), _ptr(delta_), _ptr(A), _ptr(B_), _ptr(C_), _ptr(D), _ptr(delta_bias), int(delta_softplus), _ptr(y),
        batch, length, channels, A.shape[1], torch.get_num_threads())
    return y.transpose(1, 2)


def selective_scan_cpu_backward(dy, u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """Gradients (du, ddelta, dA, dB, dC, dD, ddelta_bias) of ``selective_scan_cpu`` for the output gradient dy.

    Shapes as the inputs'; None for an absent D or delta_bias. More than 64 states run the ``torch`` backend's.
    """
    library = _library_for(A.shape[1])
    if library is None:
        return vjp_backward(selective_scan_torch)(dy, u, delta, A, B, C, D, delta_bias, delta_softplus)
    batch, channels, length = u.shape
    nstate, groups = A.shape[1], -(-channels // _LANES)
    dy_, u_, delta_, B_, C_ = _tokens_first(dy, u, delta, B, C)
    A, D, delta_bias = _vectors(A, D, delta_bias)
    du, ddelta = torch.empty_like(u_), torch.empty_like(delta_)
    dA = u_.new_empty(batch, channels, nstate)
    dB, dC = (u_.new_empty(batch, groups, length, nstate) for _ in range(2))
    dD, dbias = (None if t is None else u_.new_empty(batch, channels) for t in (D, delta_bias))
    status = library.mv_selective_scan_bwd(
        _ptr(u_), _ptr(delta_), _ptr(A), _ptr(B_), _ptr(C_), _ptr(D), _ptr(delta_bias), int(delta_softplus),
        _ptr(dy_), _ptr(du), _ptr(ddelta), _ptr(dA), _ptr(dB), _ptr(dC), _ptr(dD), _ptr(dbias),
        batch, length, channels, nstate, torch.get_num_threads())
    if status != 0:
        raise MemoryError(f'the CPU scan backward could not allocate its {length} x {nstate} state buffers')
    return (du.transpose(1, 2), ddelta.transpose(1, 2), dA.sum(0), dB.sum(1).transpose(1, 2),
            dC.sum(1).transpose(1, 2), None if dD is None else dD.sum(0), None if dbias is None else dbias.sum(0))
