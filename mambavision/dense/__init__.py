"""Dense prediction with MambaVision: NVIDIA's published detection (Cascade Mask R-CNN, COCO) and
segmentation (UPerNet, ADE20K) models, without mmcv/mmdet/mmseg, and the pieces they share.

``create_detector`` / ``create_segmenter`` build them (``list_detectors()`` / ``list_segmenters()``
name them); ``mambavision.published`` describes each published model.
"""
from .detection import CascadeMaskRCNN, create_detector, list_detectors
from .segmentation import UPerNet, create_segmenter, list_segmenters

__all__ = ['CascadeMaskRCNN', 'create_detector', 'list_detectors', 'UPerNet', 'create_segmenter', 'list_segmenters']
