"""Our CPU selective-scan kernel (forward), built on first use with the machine's C compiler.

``csrc/selective_scan_cpu.c`` is plain C with GCC/Clang vector extensions and OpenMP: one
work item per sequence and group of 16 channels, whose states stay in registers for the
whole sweep, with vectorised exp and log; softplus, ``delta_bias`` and the ``D * u`` skip
are done in the kernel. It needs no PyTorch headers, so it compiles in under a second.

Build: ``$CC``, else ``cc``, ``gcc`` or ``clang`` from ``PATH``, with ``-O3 -march=native
-fopenmp``, falling back to fewer flags when the compiler refuses one. The library goes to
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
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional

import torch

__all__ = ['load', 'selective_scan_cpu']

SOURCE = Path(__file__).parent / 'csrc' / 'selective_scan_cpu.c'
CACHE_ENV_VAR = 'MAMBAVISION_CACHE'
_FLAG_SETS = (('-O3', '-march=native', '-fopenmp'), ('-O3', '-fopenmp'), ('-O3',))

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_tried = False


def _compiler() -> Optional[str]:
    return os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc') or shutil.which('clang')


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


def _build(compiler: str) -> Optional[ctypes.CDLL]:
    """Compile (or find in the cache) and load the library with the first flag set that works."""
    source = SOURCE.read_bytes()
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b'\0'.join([source, compiler.encode(), ' '.join(flags).encode(), _cpu_id().encode()]))
        target = cache / f'selective_scan_cpu-{key.hexdigest()[:16]}.so'
        if not target.exists():
            partial = target.with_name(f'.{target.name}.{os.getpid()}')
            try:
                done = subprocess.run([compiler, *flags, '-std=c99', '-shared', '-fPIC', str(SOURCE), '-o', str(partial)],
                                      capture_output=True, timeout=120).returncode == 0
                if done:
                    os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            if not done:
                continue
        try:
            library = ctypes.CDLL(str(target))
        except OSError:
            continue
        pointer, long = ctypes.c_void_p, ctypes.c_long
        library.mv_selective_scan_fwd.argtypes = [pointer] * 7 + [ctypes.c_int, pointer] + [long] * 4 + [ctypes.c_int]
        library.mv_selective_scan_fwd.restype = None
        library.mv_max_state.restype = ctypes.c_int
        return library
    return None


def load() -> Optional[ctypes.CDLL]:
    """The kernel library, built on the first call; None when no compiler can build it (tried once)."""
    global _library, _tried
    with _lock:
        if not _tried:
            _tried = True
            compiler = _compiler()
            try:
                _library = _build(compiler) if compiler else None
            except (OSError, subprocess.SubprocessError):  # unwritable cache, compiler that hangs or vanished
                _library = None
        return _library


def selective_scan_cpu(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True):
    """float32 scan of CPU tensors by the kernel; shapes as ``selective_scan`` (u, delta (B, D, L) -> y (B, D, L)).

    The kernel holds at most ``mv_max_state()`` (64) states per channel; larger states run the ``torch`` backend.
    """
    library = load()
    if library is None:
        raise RuntimeError('the CPU scan kernel could not be built (no working C compiler); use the torch backend')
    if A.shape[1] > library.mv_max_state():
        from .selective_scan import selective_scan_torch
        return selective_scan_torch(u, delta, A, B, C, D, delta_bias, delta_softplus)
    batch, channels, length = u.shape
    u_, delta_, B_, C_ = (t.float().transpose(1, 2).contiguous() for t in (u, delta, B, C))  # (B, L, .)
    A, D, delta_bias = (None if t is None else t.float().contiguous() for t in (A, D, delta_bias))
    y = u_.new_empty(batch, length, channels)
    library.mv_selective_scan_fwd(
        u_.data_ptr(), delta_.data_ptr(), A.data_ptr(), B_.data_ptr(), C_.data_ptr(),
        None if D is None else D.data_ptr(), None if delta_bias is None else delta_bias.data_ptr(),
        int(delta_softplus), y.data_ptr(), batch, length, channels, A.shape[1], torch.get_num_threads())
    return y.transpose(1, 2)
