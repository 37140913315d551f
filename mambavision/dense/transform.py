"""The image transforms of the published test pipelines, on both sides of the network.

``ImageTransform``: an (H, W, 3) uint8 RGB image -> the normalised network input at the test scale
(mmcv's keep-ratio resize), and same-size inputs -> one zero-padded batch. ``DetectionTransform``
adds the detector's postprocessing: detections in network-input pixels -> the original image
(boxes rescaled, masks pasted and thresholded), as torchvision's ``GeneralizedRCNNTransform`` does.
"""
import math
import mmap
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .boxes import paste_mask
from .image import normalize, resize_keep_ratio

__all__ = ['ImageTransform', 'DetectionTransform', 'zero_masks', 'paste_masks']


class ImageTransform(nn.Module):
    """Keep-ratio resize to ``test_scale`` (long side, short side), normalise, zero-pad batches on the right
    and bottom to multiples of ``size_divisor`` (None: no padding, only images of one size batch)."""

    def __init__(self, test_scale: Tuple[int, int], size_divisor: Optional[int] = None):
        super().__init__()
        self.test_scale, self.size_divisor = tuple(test_scale), size_divisor

    def preprocess(self, image: np.ndarray) -> Tuple[torch.Tensor, Tuple[float, float]]:
        """(H, W, 3) uint8 RGB -> normalised (3, h, w) float32 at the test scale and its (w, h) scale factors."""
        resized, scale_factor = resize_keep_ratio(image, self.test_scale)
        return normalize(resized), scale_factor

    def padded_size(self, image: torch.Tensor) -> Tuple[int, int]:
        """(3, h, w) -> (h, w) rounded up to multiples of ``size_divisor``."""
        d = self.size_divisor or 1
        return math.ceil(image.shape[1] / d) * d, math.ceil(image.shape[2] / d) * d

    def pad_batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(3, h, w) images -> (B, 3, H, W), zero-padded right and bottom to the largest padded size."""
        height, width = (max(sizes) for sizes in zip(*(self.padded_size(im) for im in images)))
        return torch.stack([F.pad(im, (0, width - im.shape[2], 0, height - im.shape[1])) for im in images])

    def extra_repr(self) -> str:
        return f'test_scale={self.test_scale}, size_divisor={self.size_divisor}'


LAZY_ZEROS_BYTES = 2 ** 26  # masks from this size on get their memory where boxes are pasted only


def zero_masks(shape: Tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """An (N, H, W) bool tensor of zeros, on the CPU from ``LAZY_ZEROS_BYTES`` on in a private anonymous memory
    mapping: the OS provides its pages (zeros) at the first write, so masks written only around their boxes
    take memory there only (100 masks of a 36 MP photo: 3.6 GB as ``torch.zeros``, a few hundred MB this way)."""
    size = math.prod(shape)
    if device.type != 'cpu' or size < max(LAZY_ZEROS_BYTES, 1) or not hasattr(mmap, 'MAP_PRIVATE'):
        return torch.zeros(shape, dtype=torch.bool, device=device)
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=torch.bool).view(shape)  # the tensor keeps the mapping alive


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                threshold: float) -> torch.Tensor:
    """(N, 28, 28) mask probabilities in the frames of (N, 4) boxes -> (N, H, W) bool masks of an (H, W) image,
    ``probability >= threshold`` (mmdet's mask pasting, box by box, each written on the pixels around its box)."""
    masks = zero_masks((len(boxes), *image_size), boxes.device)
    for i, box in enumerate(boxes):
        pasted, (rows, cols) = paste_mask(probs[i], box, image_size)
        masks[i, rows, cols] = pasted >= threshold
    return masks


class DetectionTransform(ImageTransform):
    """``ImageTransform`` with the detector's postprocessing (masks thresholded at ``mask_threshold``)."""

    def __init__(self, test_scale: Tuple[int, int], size_divisor: Optional[int] = 32, mask_threshold: float = 0.5):
        super().__init__(test_scale, size_divisor)
        self.mask_threshold = mask_threshold

    def postprocess(
            self, detections: Sequence[Dict[str, torch.Tensor]], image_sizes: Sequence[Tuple[int, int]],
            original_sizes: Sequence[Tuple[int, int]],
    ) -> List[Dict[str, torch.Tensor]]:
        """Per image: detections in network-input pixels (``boxes``, ``scores``, ``labels``, ``mask_probs``)
        -> ``boxes`` (N, 4) in original pixels (divided by the resize's scale factors, as mmdet does),
        ``scores``, ``labels`` and ``masks`` (N, H, W) bool at the original (H, W)."""
        results = []
        for detection, (h, w), original_size in zip(detections, image_sizes, original_sizes):
            sx, sy = w / original_size[1], h / original_size[0]  # the resize's (new_w / w, new_h / h)
            boxes = detection['boxes'] / detection['boxes'].new_tensor([sx, sy, sx, sy])
            masks = paste_masks(detection['mask_probs'], boxes, original_size, self.mask_threshold)
            results.append(dict(boxes=boxes, scores=detection['scores'], labels=detection['labels'], masks=masks))
        return results

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, mask_threshold={self.mask_threshold}'
