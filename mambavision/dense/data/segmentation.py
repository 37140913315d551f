"""Segmentation training data: one's own folder or ADE20K, mmseg 1.2.2's published training pipeline, batching.

A dataset item is ``(image, label)``: ``image`` (3, h, w) float32, normalised with the published mean and std
after the pipeline; ``label`` (h, w) int64 class indices, 255 = ignored. ``collate_segmentation`` pads a batch
to the crop size as mmseg's ``SegDataPreProcessor`` does (image 0 after normalisation, label 255).

Own data: ``DIR/train/images/*.jpg`` (any image type) with ``DIR/train/masks/*.png`` of the same file stems
(8-bit grayscale or palette PNGs of class indices, 255 = ignored), ``DIR/val/`` alike, and the class names
in ``DIR/classes.txt`` (one per line) or ``DIR/classes.json`` (a list of names, or ``{"classes": [...],
"palette": [[r, g, b], ...]}``). Reading it checks every pair before any training: images without masks,
masks without images, sizes that differ and class values beyond the class count each raise one line naming
the first offending file. ADE20K (``ADEChallengeData2016``) is read as the published config reads it
(reduce_zero_label: 0 -> 255, k -> k - 1).

Every random choice of ``SegmentationTrainPipeline`` is drawn from the ``numpy.random.Generator`` it is
called with; ``SegmentationDataset`` seeds one per sample from (seed, epoch, index), so a run resumes exactly.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch

from ..classes import ADE20K_CLASSES, ADE20K_PALETTE
from ..evaluate import ade20k_samples, read_ade20k_label
from ..image import _cv2, normalize, read_image_file, resize_keep_ratio
from .transforms import IMAGE_EXTENSIONS, image_file_size

__all__ = [
    'IGNORE_INDEX', 'CROP_SIZE', 'random_resize', 'random_crop', 'random_flip', 'photometric_distortion',
    'SegmentationTrainPipeline', 'SegmentationSplit', 'read_segmentation_folder', 'read_ade20k',
    'segmentation_split', 'read_mask', 'SegmentationDataset', 'collate_segmentation',
]

IGNORE_INDEX = 255
CROP_SIZE = (512, 512)  # the published crop (L3: 640)
RATIO_RANGE = (0.5, 2.0)
CAT_MAX_RATIO = 0.75
CROP_TRIES = 10  # RandomCrop draws again up to this many times while one class dominates the crop
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18


# ---------------------------------------------------------------------------------------------
# transforms: (H, W, 3) uint8 RGB image and (H, W) uint8 label, random choices from ``rng``


def random_resize(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, scale: Tuple[int, int],
                  ratio_range: Tuple[float, float] = RATIO_RANGE) -> Tuple[np.ndarray, np.ndarray]:
    """mmcv's ``RandomResize(scale, ratio_range, keep_ratio=True)``: ``scale`` times a ratio uniform in
    ``ratio_range`` (each edge truncated to int), then the keep-ratio rescale to fit it; the image bilinear,
    the label nearest (cv2)."""
    low, high = ratio_range
    ratio = rng.random() * (high - low) + low
    image, _ = resize_keep_ratio(image, (int(scale[0] * ratio), int(scale[1] * ratio)))
    height, width = image.shape[:2]
    label = _cv2().resize(label, (width, height), interpolation=_cv2().INTER_NEAREST)
    return image, label


def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, crop_size: Tuple[int, int],
                cat_max_ratio: float = CAT_MAX_RATIO, ignore_index: int = IGNORE_INDEX
                ) -> Tuple[np.ndarray, np.ndarray]:
    """mmseg's ``RandomCrop``: a crop of at most ``crop_size`` (h, w) at a uniform offset (top, then left),
    drawn again up to 10 times while fewer than two classes show or one class covers ``cat_max_ratio`` or
    more of the crop's labelled pixels (the last draw is kept unchecked)."""
    margin_h = max(image.shape[0] - crop_size[0], 0)
    margin_w = max(image.shape[1] - crop_size[1], 0)

    def draw() -> Tuple[slice, slice]:
        top, left = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
        return slice(top, top + crop_size[0]), slice(left, left + crop_size[1])

    rows, cols = draw()
    if cat_max_ratio < 1:
        for _ in range(CROP_TRIES):
            counts = np.bincount(label[rows, cols].ravel(), minlength=256)
            counts[ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            rows, cols = draw()
    return image[rows, cols], label[rows, cols]


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float = 0.5
                ) -> Tuple[np.ndarray, np.ndarray]:
    """Mirror image and label left-right with probability ``prob`` (mmseg's ``RandomFlip``, 'horizontal')."""
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def _scale_and_shift(channels: np.ndarray, alpha: float = 1., beta: float = 0.) -> np.ndarray:
    """uint8 ``channels * alpha + beta`` in float32, clipped to 0..255 and truncated, as mmseg's ``convert``."""
    return np.clip(channels.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(np.uint8)


def photometric_distortion(
        image: np.ndarray, rng: np.random.Generator, brightness_delta: int = BRIGHTNESS_DELTA,
        contrast_range: Tuple[float, float] = CONTRAST_RANGE, saturation_range: Tuple[float, float] = SATURATION_RANGE,
        hue_delta: int = HUE_DELTA) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` of an (H, W, 3) uint8 RGB image, its arithmetic and order of draws.

    Each step with probability 0.5: brightness (+ uniform(-delta, delta)); contrast (x uniform in range),
    first or last at random; saturation (HSV S x uniform in range); hue (H + an integer in [-delta, delta),
    modulo 180). The HSV steps convert with OpenCV's RGB <-> HSV (mmcv converts BGR images, the same numbers).
    """
    cv2 = _cv2()

    def contrast(img: np.ndarray) -> np.ndarray:
        return _scale_and_shift(img, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else img

    if rng.integers(2):
        image = _scale_and_shift(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2) == 1
    if contrast_first:
        image = contrast(image)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _scale_and_shift(hsv[:, :, 1], alpha=rng.uniform(*saturation_range))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + int(rng.integers(-hue_delta, hue_delta))) % 180
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if not contrast_first:
        image = contrast(image)
    return image


class SegmentationTrainPipeline:
    """The published training pipeline (mmseg 1.2.2), all randomness from the generator passed in.

    RandomResize (``scale``, by default (4 x crop, crop): (2048, 512), times a ratio in ``ratio_range``,
    keep ratio) -> RandomCrop ``crop_size`` with ``cat_max_ratio`` -> RandomFlip ``flip_prob`` ->
    PhotoMetricDistortion. Padding to the crop size is ``collate_segmentation``'s.
    ``(H, W, 3) uint8 RGB, (H, W) uint8 label, rng -> (h, w, 3), (h, w)`` with h, w <= the crop size.
    """

    def __init__(self, crop_size: Union[int, Tuple[int, int]] = CROP_SIZE, scale: Optional[Tuple[int, int]] = None,
                 ratio_range: Tuple[float, float] = RATIO_RANGE, cat_max_ratio: float = CAT_MAX_RATIO,
                 flip_prob: float = 0.5, photometric: bool = True):
        # tuple() takes lists (from a config file) and keeps their two entries
        crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        self.crop_size = cast(Tuple[int, int], crop)
        self.scale = cast(Tuple[int, int], tuple(scale) if scale is not None else (4 * max(crop), max(crop)))
        self.ratio_range = cast(Tuple[float, float], tuple(ratio_range))
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = photometric

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> Tuple[np.ndarray, np.ndarray]:
        image, label = random_resize(image, label, rng, self.scale, self.ratio_range)
        image, label = random_crop(image, label, rng, self.crop_size, self.cat_max_ratio)
        image, label = random_flip(image, label, rng, self.flip_prob)
        if self.photometric:
            image = photometric_distortion(image, rng)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(crop_size={self.crop_size}, scale={self.scale}, '
                f'ratio_range={self.ratio_range}, cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, '
                f'photometric={self.photometric})')


# ---------------------------------------------------------------------------------------------
# datasets


def read_mask(path: str) -> np.ndarray:
    """(H, W) uint8 class indices of a mask file: an 8-bit grayscale or palette PNG, its values unchanged."""
    from PIL import Image
    try:
        with Image.open(path) as mask:
            if mask.mode not in ('L', 'P'):
                raise ValueError(f'mask {path} is a {mask.mode} image; expected an 8-bit grayscale or palette PNG '
                                 f'of class indices (255 = ignore)')
            return np.array(mask)
    except OSError as e:
        raise ValueError(f'cannot read mask {path}: {e}') from None


@dataclass(frozen=True)
class SegmentationSplit:
    """The (image file, label file) pairs of one split, its classes, and how its label files read.

    ``reduce_zero_label``: ADE20K's labels (0 -> 255, k -> k - 1); otherwise a mask's values are its classes.
    """
    samples: Tuple[Tuple[str, str], ...]
    class_names: Tuple[str, ...]
    palette: Optional[Tuple[Tuple[int, int, int], ...]] = None
    reduce_zero_label: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def read_label(self, path: str) -> np.ndarray:
        """(H, W) uint8 class indices (255 = ignored) of a label file of this split."""
        return read_ade20k_label(path) if self.reduce_zero_label else read_mask(path)


def _read_classes(folders: Sequence[Path]) -> Tuple[Tuple[str, ...], Optional[Tuple[Tuple[int, int, int], ...]]]:
    """Class names (and palette) from the first ``classes.txt`` / ``classes.json`` found in ``folders``."""
    for folder in folders:
        if (folder / 'classes.txt').is_file():
            lines = (folder / 'classes.txt').read_text(encoding='utf-8').splitlines()
            return tuple(line.strip() for line in lines if line.strip()), None
        if (folder / 'classes.json').is_file():
            return _read_classes_json(folder / 'classes.json')
    raise FileNotFoundError(f'no classes.txt or classes.json in {" or ".join(map(str, folders))}: expected the class '
                            f'names, one per line (classes.txt) or as a JSON list or {{"classes": [...], '
                            f'"palette": [[r, g, b], ...]}}')


def _read_classes_json(path: Path):
    try:
        content = json.loads(path.read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is not valid JSON ({e})') from None
    if isinstance(content, dict):
        names, palette = content.get('classes', content.get('names')), content.get('palette')
    else:
        names, palette = content, None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f'{path}: expected a list of class names, or {{"classes": [...], "palette": [[r, g, b], '
                         f'...]}}')
    if palette is not None and (len(palette) != len(names) or not all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette)):
        raise ValueError(f'{path}: the palette needs one [r, g, b] (integers 0-255) per class ({len(names)})')
    return tuple(names), None if palette is None else tuple(tuple(c) for c in palette)


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> Dict[str, Path]:
    """Path relative to ``folder`` without its extension -> file, for the files of ``extensions``."""
    files: Dict[str, Path] = {}
    for path in sorted(folder.rglob('*')):
        if path.suffix.lower() in extensions and path.is_file():
            stem = str(path.relative_to(folder).with_suffix(''))
            if stem in files:
                raise ValueError(f'{files[stem]} and {path} share the stem {stem!r}; expected one file per stem')
            files[stem] = path
    return files


def _check_pair(image: str, mask: str, num_classes: int) -> None:
    label = read_mask(mask)
    if label.shape != image_file_size(image):
        height, width = image_file_size(image)
        raise ValueError(f'mask {mask} is {label.shape[1]}x{label.shape[0]} (width x height), its image {image} '
                         f'{width}x{height}; expected the same size')
    beyond = label[(label >= num_classes) & (label != IGNORE_INDEX)]
    if beyond.size:
        raise ValueError(f'mask {mask} holds class {int(beyond.max())}, beyond the {num_classes} classes '
                         f'(values 0..{num_classes - 1}, 255 = ignore)')


def read_segmentation_folder(folder: str, class_names: Optional[Sequence[str]] = None,
                             palette: Optional[Sequence[Sequence[int]]] = None) -> SegmentationSplit:
    """One's own split: ``folder/images/`` and ``folder/masks/*.png`` of matching file stems, every pair checked.

    The class names come from ``class_names``, else ``classes.txt`` / ``classes.json`` in ``folder`` or its
    parent. Raises one line naming the first image without a mask, mask without an image, pair whose sizes
    differ or mask whose values go beyond the classes.
    """
    root = Path(folder)
    images_dir, masks_dir = root / 'images', root / 'masks'
    for sub in (images_dir, masks_dir):
        if not sub.is_dir():
            raise FileNotFoundError(f'{sub} not found: expected {root}/images/ and {root}/masks/ (PNG class indices '
                                    f'of the same file stems), or the ADE20K layout (ADEChallengeData2016)')
    if class_names is None:
        class_names, palette = _read_classes([root, root.parent])
    images, masks = _files_by_stem(images_dir, IMAGE_EXTENSIONS), _files_by_stem(masks_dir, ('.png',))
    if not images:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {images_dir}')
    for stem, image in images.items():
        if stem not in masks:
            raise FileNotFoundError(f'image {image} has no mask {masks_dir / stem}.png')
    for stem, mask in masks.items():
        if stem not in images:
            raise FileNotFoundError(f'mask {mask} has no image {images_dir / stem}.* in {images_dir}')
    samples = tuple((str(images[stem]), str(masks[stem])) for stem in images)
    for image_file, mask_file in samples:
        _check_pair(image_file, mask_file, len(class_names))
    colors = None if palette is None else cast(Tuple[Tuple[int, int, int], ...], tuple(map(tuple, palette)))
    return SegmentationSplit(samples, tuple(class_names), colors)


_ADE20K_SPLITS = {'train': 'training', 'val': 'validation', 'training': 'training', 'validation': 'validation'}


def read_ade20k(data_dir: str, split: str = 'train') -> SegmentationSplit:
    """ADE20K (``ADEChallengeData2016``): ``images/<training|validation>/*.jpg`` with ``annotations/...png``,
    150 classes, labels read with reduce_zero_label as the published config reads them."""
    if split not in _ADE20K_SPLITS:
        raise ValueError(f'unknown ADE20K split {split!r}; expected train or val')
    return SegmentationSplit(tuple(ade20k_samples(data_dir, _ADE20K_SPLITS[split])), tuple(ADE20K_CLASSES),
                             tuple(map(tuple, ADE20K_PALETTE)), reduce_zero_label=True)


def segmentation_split(data_dir: str, split: str = 'train') -> SegmentationSplit:
    """The ``split`` ('train' or 'val') of ``data_dir``, its layout recognised: ADE20K (``images/training``),
    one's own folder with ``train/`` and ``val/`` beneath, or a folder that is itself one split (``images/``,
    ``masks/``)."""
    root = Path(data_dir)
    if (root / 'images' / 'training').is_dir() and (root / 'annotations').is_dir():
        return read_ade20k(data_dir, split)
    if (root / split / 'images').is_dir():
        return read_segmentation_folder(str(root / split))
    if (root / 'images').is_dir():
        return read_segmentation_folder(data_dir)
    raise FileNotFoundError(f'{data_dir}: expected {split}/images/ and {split}/masks/ beneath it (with classes.txt or '
                            f'classes.json), images/ and masks/ in it, or the ADE20K layout (images/training, '
                            f'annotations/training)')


class SegmentationDataset(torch.utils.data.Dataset):
    """A split's images and labels -> ``(image (3, h, w) float32 normalised, label (h, w) int64)`` through
    ``pipeline(image, label, rng)`` (none: the whole image as it is).

    The generator of item ``index`` is seeded from (seed, epoch, index): call ``set_epoch`` before each epoch.
    """

    def __init__(self, split: SegmentationSplit, pipeline=None, seed: int = 0):
        self.split = split
        self.pipeline = pipeline
        self.seed = seed
        self.epoch = 0

    @property
    def class_names(self) -> Tuple[str, ...]:
        return self.split.class_names

    def __len__(self) -> int:
        return len(self.split.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 RGB image and (H, W) uint8 label of item ``index``, untransformed."""
        image_path, label_path = self.split.samples[index]
        image, label = read_image_file(image_path), self.split.read_label(label_path)
        if image.shape[:2] != label.shape:
            raise ValueError(f'label {label_path} is {label.shape[1]}x{label.shape[0]} (width x height), its image '
                             f'{image_path} {image.shape[1]}x{image.shape[0]}; expected the same size')
        return image, label

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        if self.pipeline is not None:
            image, label = self.pipeline(image, label, self.rng(index))
        return normalize(image), torch.from_numpy(label.astype(np.int64))


def collate_segmentation(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                         size: Optional[Tuple[int, int]] = CROP_SIZE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Items -> (inputs (B, 3, H, W), labels (B, H, W) int64), padded at the bottom and right to ``size``
    (or to the largest item where it is larger, or ``size=None``) as mmseg's ``SegDataPreProcessor`` pads:
    the normalised image with 0, the label with 255. Bind ``size`` with ``functools.partial`` for a DataLoader."""
    images, labels = zip(*batch)
    height = max([image.shape[1] for image in images] + ([size[0]] if size else []))
    width = max([image.shape[2] for image in images] + ([size[1]] if size else []))
    inputs = images[0].new_zeros((len(images), 3, height, width))
    targets = torch.full((len(images), height, width), IGNORE_INDEX, dtype=torch.int64)
    for slot, target, image, label in zip(inputs, targets, images, labels):
        slot[:, :image.shape[1], :image.shape[2]].copy_(image)
        target[:label.shape[0], :label.shape[1]].copy_(label)
    return inputs, targets
