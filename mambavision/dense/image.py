"""Images in, network input out: the published test pipelines' image steps, exact.

``as_rgb_images`` turns what a user hands ``predict`` into (H, W, 3) uint8 RGB arrays;
``resize_keep_ratio`` is mmcv's keep-ratio rescale (cv2 bilinear on uint8), and
``normalize`` the published mean/std normalisation.
"""
import os
from typing import List, Sequence, Tuple

import numpy as np
import torch

__all__ = ['MEAN', 'STD', 'as_rgb_images', 'read_image_file', 'resize_keep_ratio', 'normalize']

# the published models' RGB normalisation, on the 0-255 scale
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def _from_pil(image) -> np.ndarray:
    if image.mode in ('I;16', 'I;16L', 'I;16B', 'I'):  # 16-bit PNGs open as one of these
        return np.asarray(image)
    if image.mode == 'F':
        raise ValueError('a floating-point PIL image (mode F) is not supported; expected 8- or 16-bit RGB or grayscale')
    return np.asarray(image.convert('RGB'))


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError(
            'the published test pipelines read and resize images with OpenCV: pip install opencv-python-headless '
            '(in a checkout of mambavision: pip install -e ".[dense]")') from None
    return cv2


def read_image_file(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of image file ``path``, decoded as mmcv's ``LoadImageFromFile`` decodes it
    (OpenCV, colour: grayscale gets three channels, alpha is dropped, 16 bits become 8, EXIF orientation applied)."""
    cv2 = _cv2()
    if os.path.isdir(path):
        raise IsADirectoryError(f'{path} is a directory, expected an image file')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image not found: {path}')
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f'cannot read image {path}: not an image file OpenCV can decode')
    return np.ascontiguousarray(image[..., ::-1])


def _to_rgb_uint8(image) -> np.ndarray:
    """One image -> (H, W, 3) uint8 RGB."""
    from PIL import Image
    if isinstance(image, (str, os.PathLike)):
        return read_image_file(image)
    if isinstance(image, Image.Image):
        array = _from_pil(image)
    elif isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f'expected a PIL image, a numpy array, a tensor or a path, got {type(image).__name__}')
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)  # grayscale
    if array.ndim != 3 or array.shape[2] not in (3, 4) or 0 in array.shape:
        raise ValueError(f'expected an (H, W, 3) RGB image (or grayscale, or RGBA), got shape {tuple(array.shape)}')
    array = array[:, :, :3]  # RGBA: the alpha channel is dropped
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype in (np.uint16, np.int32) and array.min() >= 0 and array.max() <= 65535:
        return np.round(array.astype(np.float32) / 257).astype(np.uint8)  # 16 bits -> 8 bits
    raise ValueError(f'expected a uint8 (or 16-bit) image, got dtype {array.dtype}; '
                     f'convert float images with (x * 255).round().astype(np.uint8)')


def as_rgb_images(images) -> List[np.ndarray]:
    """An image or a list of them (PIL, (H, W, 3) uint8 array or tensor, path) -> list of (H, W, 3) uint8 RGB.

    Files are decoded as mmcv decodes them (``read_image_file``). Arrays and PIL images:
    grayscale gets three channels, RGBA loses its alpha, 16-bit images are scaled to 8 bits
    (x / 257, rounded); anything else raises a one-line error.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError('expected at least one image, got an empty list')
        return [_to_rgb_uint8(image) for image in images]
    return [_to_rgb_uint8(images)]


def resize_keep_ratio(image: np.ndarray, scale: Sequence[int]) -> Tuple[np.ndarray, Tuple[float, float]]:
    """mmcv's keep-ratio rescale of an (H, W, C) uint8 image to fit ``scale`` (long edge, short edge).

    The factor is min(long / long side, short / short side), the new size ``int(x * factor + 0.5)``,
    the interpolation cv2's bilinear. Returns the image and (new_w / w, new_h / h).
    """
    cv2 = _cv2()
    h, w = image.shape[:2]
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return resized, (new_w / w, new_h / h)


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 with the published mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std
