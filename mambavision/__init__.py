"""MambaVision backbones for PyTorch and timm: ``import mambavision`` registers the models with timm."""
from .model import (
    Attention, ConvBlock, Downsample, HybridBlock, MambaVision, MambaVisionMixer, MambaVisionStage, Stem,
    window_partition, window_reverse,
)
from .dense.detection import create_detector, list_detectors
from .dense.segmentation import create_segmenter, list_segmenters
from .inference import optimize_for_inference
from .ops.selective_scan import available_scan_backends, get_scan_backend, selective_scan, set_scan_backend
from .weights import checkpoint_filter_fn, read_state_dict

__version__ = '0.1.0'

__all__ = [
    'Attention', 'ConvBlock', 'Downsample', 'HybridBlock', 'MambaVision', 'MambaVisionMixer', 'MambaVisionStage',
    'Stem', 'window_partition', 'window_reverse', 'available_scan_backends', 'get_scan_backend', 'selective_scan',
    'set_scan_backend', 'checkpoint_filter_fn', 'read_state_dict', 'optimize_for_inference',
    'create_detector', 'list_detectors', 'create_segmenter', 'list_segmenters',
]
