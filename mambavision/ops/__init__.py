"""Kernels and their pure-PyTorch references."""
from .selective_scan import (
    available_scan_backends, get_scan_backend, resolve_scan_backend, selective_scan, set_scan_backend,
)
from .torch_scan import selective_scan_ref, selective_scan_torch

__all__ = [
    'available_scan_backends', 'get_scan_backend', 'resolve_scan_backend', 'selective_scan', 'set_scan_backend',
    'selective_scan_ref', 'selective_scan_torch',
]
