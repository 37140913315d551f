"""Detection training data: COCO- and YOLO-format datasets, mmdet 3.3.0's published training pipeline, batching.

A dataset item is ``(image, target)``: ``image`` (3, h, w) float32, normalised with the published mean and
std after the pipeline; ``target`` in torchvision's form: ``boxes`` (N, 4) float32 x1 y1 x2 y2 in pixels of
the transformed image, ``labels`` (N,) int64 from 0, ``masks`` (N, h, w) uint8 (absent for boxes-only data),
``image_size`` (h, w), ``image_id``, ``orig_size`` (the file's (h, w)) and ``scale_factor`` (w, h factors of
the last resize, as mmdet records them). ``collate_detection`` pads a batch with zeros to a multiple of 32.

What mmdet's ``CocoDataset`` and ``LoadAnnotations`` do is done here too: crowd objects (and objects whose
mask annotation is unusable) are left out of training, objects smaller than 1 px or outside their image are
left out, masks are decoded at the image's size with pycocotools, and for training images without
annotations or smaller than 32 px are dropped (``filter_empty_gt``, ``min_size=32``).

Every random choice of ``DetectionTrainPipeline`` is drawn from the ``numpy.random.Generator`` it is called
with; ``DetectionDataset`` seeds one per sample from (seed, epoch, index), so a run resumes exactly.
"""
import contextlib
import functools
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..image import _cv2, normalize, read_image_file, resize_keep_ratio
from .transforms import IMAGE_EXTENSIONS, image_file_size

__all__ = [
    'TRAIN_SCALES', 'CROP_SCALES', 'CROP_RANGE', 'TEST_SCALE', 'ImageRecord', 'DetectionDataset',
    'DetectionTrainPipeline', 'DetectionTestPipeline', 'hflip', 'resize', 'crop', 'collate_detection',
    'read_coco_detection', 'read_yolo_detection', 'detection_dataset', 'decode_masks',
]

# the published training pipeline's scales: (short edge, long edge), keep ratio
TRAIN_SCALES = tuple((short, 1333) for short in range(480, 801, 32))
CROP_SCALES = ((400, 1333), (500, 1333), (600, 1333))  # the resize before the random crop
CROP_RANGE = (384, 600)  # RandomCrop absolute_range: crop height and width each drawn from it
TEST_SCALE = (1333, 800)
MIN_SIZE = 32  # training images smaller than this (either side) are dropped
SIZE_DIVISOR = 32  # the batch is padded to a multiple of this

Target = Dict[str, Any]


# ---------------------------------------------------------------------------------------------
# transforms: (H, W, 3) uint8 image and a target of numpy arrays (boxes, labels, optional masks)


def hflip(image: np.ndarray, target: Target) -> Tuple[np.ndarray, Target]:
    """Mirror the image, its boxes and masks left-right (mmdet's RandomFlip, 'horizontal')."""
    width = image.shape[1]
    boxes = target['boxes']
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    target = dict(target, boxes=flipped)
    if 'masks' in target:
        target['masks'] = np.ascontiguousarray(target['masks'][:, :, ::-1])
    return np.ascontiguousarray(image[:, ::-1]), target


def _resize_masks(masks: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(N, H, W) uint8 masks -> (N, h, w), nearest neighbour as mmcv's ``imrescale(..., 'nearest')``."""
    cv2 = _cv2()
    height, width = size
    out = np.empty((len(masks), height, width), np.uint8)
    for start in range(0, len(masks), 128):  # OpenCV 5 takes at most 128 channels; nearest is per channel
        chunk = np.ascontiguousarray(masks[start:start + 128].transpose(1, 2, 0))
        resized = cv2.resize(chunk, (width, height), interpolation=cv2.INTER_NEAREST)
        out[start:start + 128] = resized.reshape(height, width, -1).transpose(2, 0, 1)
    return out


def resize(image: np.ndarray, target: Target, scale: Sequence[int]) -> Tuple[np.ndarray, Target]:
    """mmdet's keep-ratio ``Resize`` to fit ``scale`` (long, short edge, either order): the image bilinear,
    the masks nearest, the boxes scaled in float32 and clipped to the new image; records ``scale_factor``."""
    resized, (w_scale, h_scale) = resize_keep_ratio(image, scale)
    height, width = resized.shape[:2]
    boxes = target['boxes'] * np.array([w_scale, h_scale, w_scale, h_scale], np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    target = dict(target, boxes=boxes, scale_factor=(w_scale, h_scale))
    if 'masks' in target:
        target['masks'] = _resize_masks(target['masks'], (height, width))
    return resized, target


def crop(image: np.ndarray, target: Target, top: int, left: int, height: int, width: int
         ) -> Tuple[np.ndarray, Target]:
    """mmdet's ``RandomCrop`` with its choices made: the window (top, left, height, width) of the image; boxes
    shifted and clipped, objects with nothing left inside dropped (with their labels and masks)."""
    image = image[top:top + height, left:left + width]
    height, width = image.shape[:2]
    boxes = target['boxes'] + np.array([-left, -top, -left, -top], np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    inside = (boxes[:, 0] < width) & (boxes[:, 1] < height) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    target = dict(target, boxes=boxes[inside], labels=target['labels'][inside])
    if 'masks' in target:
        target['masks'] = np.ascontiguousarray(target['masks'][inside, top:top + height, left:left + width])
    return np.ascontiguousarray(image), target


class DetectionTrainPipeline:
    """The published training pipeline (mmdet 3.3.0), all randomness from the generator passed in.

    RandomFlip 0.5, then with equal chance (a) a keep-ratio resize to one of ``scales``, or (b) a keep-ratio
    resize to one of ``crop_scales``, a crop of height and width each uniform in ``crop_range`` (capped at
    the image; objects may all be cropped away), and a resize to one of ``scales``.
    """

    def __init__(self, scales: Sequence[Tuple[int, int]] = TRAIN_SCALES,
                 crop_scales: Sequence[Tuple[int, int]] = CROP_SCALES, crop_range: Tuple[int, int] = CROP_RANGE,
                 flip_prob: float = 0.5):
        self.scales = tuple(scales)
        self.crop_scales = tuple(crop_scales)
        self.crop_range = crop_range
        self.flip_prob = flip_prob

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator) -> Tuple[np.ndarray, Target]:
        if rng.random() < self.flip_prob:
            image, target = hflip(image, target)
        if rng.integers(2) == 1:
            image, target = resize(image, target, self.crop_scales[rng.integers(len(self.crop_scales))])
            height, width = image.shape[:2]
            low, high = self.crop_range
            crop_height = int(rng.integers(min(height, low), min(height, high) + 1))
            crop_width = int(rng.integers(min(width, low), min(width, high) + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            image, target = crop(image, target, top, left, crop_height, crop_width)
        return resize(image, target, self.scales[rng.integers(len(self.scales))])


class DetectionTestPipeline:
    """The published test pipeline's keep-ratio resize to (1333, 800); no randomness."""

    def __init__(self, scale: Tuple[int, int] = TEST_SCALE):
        self.scale = scale

    def __call__(self, image: np.ndarray, target: Target, rng: Optional[np.random.Generator] = None
                 ) -> Tuple[np.ndarray, Target]:
        return resize(image, target, self.scale)


# ---------------------------------------------------------------------------------------------
# datasets


@dataclass(frozen=True)
class ImageRecord:
    """One image's annotations as read from the files (before any transform).

    ``boxes`` (N, 4) float32 x1 y1 x2 y2 in the file's pixels, clipped to the image (mmdet clips them at the
    first resize instead: the same boxes after it, up to float32 rounding); ``labels`` (N,) int64;
    ``segmentations`` one COCO segmentation per object (polygon list or RLE dict), or None for boxes only.
    """
    image_id: int
    path: str
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    segmentations: Optional[Tuple[object, ...]] = None


def _mask_api():
    try:
        from pycocotools import mask
    except ImportError:
        raise ImportError("decoding polygon and RLE masks needs pycocotools: pip install pycocotools "
                          "(in a checkout of mambavision: pip install -e '.[coco]')") from None
    return mask


def decode_masks(segmentations: Sequence[object], height: int, width: int) -> np.ndarray:
    """(N, height, width) uint8 masks of COCO segmentations, decoded as mmdet's ``LoadAnnotations`` does:
    polygons (several parts merged) and uncompressed RLE via ``frPyObjects``, compressed RLE as it is."""
    mask_api = _mask_api()
    masks = np.zeros((len(segmentations), height, width), np.uint8)
    for i, segmentation in enumerate(segmentations):
        if isinstance(segmentation, list):
            rle = mask_api.merge(mask_api.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation['counts'], list):
            rle = mask_api.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        mask = mask_api.decode(rle)
        if mask.shape != (height, width):
            raise ValueError(f'a mask RLE of size {mask.shape[0]}x{mask.shape[1]} on an image of {height}x{width} '
                             f'(object {i}); expected RLE sizes equal to the image size')
        masks[i] = mask
    return masks


class DetectionDataset(torch.utils.data.Dataset):
    """Images with boxes (and masks) -> ``(image, target)`` through ``pipeline(image, target, rng)``.

    ``class_names[label]`` names a label and ``category_ids[label]`` is its id in the annotation file (what
    COCO results are written with, ``evaluate.coco_results``); ``coco_ground_truth()`` is what they are
    evaluated against. The generator of item ``index`` is seeded from (seed, epoch, index): call
    ``set_epoch`` before each epoch (it reaches DataLoader workers that are started per epoch).
    """

    def __init__(self, records: Sequence[ImageRecord], class_names: Sequence[str], category_ids: Sequence[int],
                 with_masks: bool, pipeline=None, seed: int = 0, annotation_file: Optional[str] = None):
        self.annotation_file = annotation_file
        self.records = list(records)
        self.class_names = tuple(class_names)
        self.category_ids = tuple(int(i) for i in category_ids)
        self.with_masks = with_masks
        self.pipeline = pipeline
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def aspect_groups(self) -> np.ndarray:
        """(N,) int64: 0 for an image narrower than it is tall, else 1, from the annotated sizes (the groups of
        mmdet's ``AspectRatioBatchSampler``, which the training engine batches by)."""
        return np.array([int(r.width >= r.height) for r in self.records], dtype=np.int64)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of item ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def load(self, index: int) -> Tuple[np.ndarray, Target]:
        """(H, W, 3) uint8 RGB image and its untransformed target (numpy boxes, labels, masks; image_id)."""
        record = self.records[index]
        image = read_image_file(record.path)
        if image.shape[:2] != (record.height, record.width):
            raise ValueError(f'image {record.path} is {image.shape[0]}x{image.shape[1]} (height x width, after EXIF '
                             f'orientation) but its annotations say {record.height}x{record.width}')
        target = dict(boxes=record.boxes.copy(), labels=record.labels.copy(), image_id=record.image_id)
        if self.with_masks:
            assert record.segmentations is not None  # a dataset with masks holds records with segmentations
            target['masks'] = decode_masks(record.segmentations, record.height, record.width)
        return image, target

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        image, target = self.load(index)
        record = self.records[index]
        target['scale_factor'] = (1.0, 1.0)
        if self.pipeline is not None:
            image, target = self.pipeline(image, target, self.rng(index))
        out: Dict[str, Any] = dict(boxes=torch.from_numpy(target['boxes']), labels=torch.from_numpy(target['labels']))
        if 'masks' in target:
            out['masks'] = torch.from_numpy(target['masks'])
        out.update(image_size=tuple(image.shape[:2]), image_id=record.image_id,
                   orig_size=(record.height, record.width), scale_factor=tuple(target['scale_factor']))
        return normalize(image), out

    @functools.cached_property
    def coco(self):
        """``coco_ground_truth()``, made once (what the training engine evaluates against)."""
        return self.coco_ground_truth()

    def coco_ground_truth(self):
        """A pycocotools ``COCO`` of the ground truth for ``evaluate.coco_evaluate``: the annotation file itself
        for COCO data (crowd objects and every image included, as mmdet evaluates), else one built from the
        records (YOLO data: every object; ``area`` of the mask, or of the box for boxes-only data)."""
        from ..evaluate import import_pycocotools, load_coco
        if self.annotation_file is not None:
            return load_coco(self.annotation_file)
        annotations = []
        for record in self.records:
            for i, ((x1, y1, x2, y2), label) in enumerate(zip(record.boxes.tolist(), record.labels.tolist())):
                annotation = dict(id=len(annotations) + 1, image_id=record.image_id, iscrowd=0,
                                  category_id=self.category_ids[label], bbox=[x1, y1, x2 - x1, y2 - y1],
                                  area=(x2 - x1) * (y2 - y1))
                if self.with_masks:
                    annotation['segmentation'] = record.segmentations[i]
                    mask = decode_masks(record.segmentations[i:i + 1], record.height, record.width)
                    annotation['area'] = float(mask.sum())
                annotations.append(annotation)
        coco = import_pycocotools()[0]()
        coco.dataset = dict(
            images=[dict(id=r.image_id, file_name=r.path, height=r.height, width=r.width) for r in self.records],
            annotations=annotations, categories=[dict(id=c, name=n) for c, n in zip(self.category_ids,
                                                                                    self.class_names)])
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco


def collate_detection(batch: Sequence[Tuple[torch.Tensor, Dict[str, object]]]
            ) -> Tuple[torch.Tensor, List[Dict[str, object]]]:
    """Items -> (inputs (B, 3, H, W) zero-padded at the bottom and right to a multiple of 32, targets):
    the normalised images padded with 0 as mmdet's ``DetDataPreprocessor`` pads them."""
    images, targets = zip(*batch)
    height = math.ceil(max(i.shape[1] for i in images) / SIZE_DIVISOR) * SIZE_DIVISOR
    width = math.ceil(max(i.shape[2] for i in images) / SIZE_DIVISOR) * SIZE_DIVISOR
    inputs = images[0].new_zeros((len(images), 3, height, width))
    for slot, image in zip(inputs, images):
        slot[:, :image.shape[1], :image.shape[2]].copy_(image)
    return inputs, list(targets)


class _Notes:
    """Counts of what was clipped or left out while reading annotations, for one warning."""

    def __init__(self, source: str):
        self.source = source
        self.clipped: List[str] = []
        self.dropped: List[str] = []

    def warn(self) -> None:
        parts = []
        if self.clipped:
            parts.append(f'{len(self.clipped)} boxes reach outside their image and were clipped '
                         f'(first: {self.clipped[0]})')
        if self.dropped:
            parts.append(f'{len(self.dropped)} objects smaller than 1 px, outside their image or with an unusable '
                         f'mask were left out as mmdet leaves them out (first: {self.dropped[0]})')
        if parts:
            warnings.warn(f'{self.source}: ' + '; '.join(parts), stacklevel=3)


def _clip_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int, what: str, notes: _Notes):
    clipped = (max(x1, 0.), max(y1, 0.), min(x2, float(width)), min(y2, float(height)))
    if clipped != (x1, y1, x2, y2):
        notes.clipped.append(what)
    return clipped


def _keep_for_training(records: List[ImageRecord], has_objects: Sequence[bool]) -> List[ImageRecord]:
    """mmdet's ``filter_empty_gt`` and ``min_size=32``."""
    return [r for r, keep in zip(records, has_objects) if keep and min(r.height, r.width) >= MIN_SIZE]


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'COCO annotation file {path} not found (expected an instances json)')
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{path}: unreadable JSON ({type(e).__name__}: {e})') from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ('images', 'annotations')) \
            or not isinstance(data.get('categories'), list) or not data['categories']:
        raise ValueError(f'{path} is not a COCO instances json: expected lists "images", "annotations" and a '
                         f'non-empty "categories"')
    return data


def _usable_segmentation(segmentation) -> Optional[object]:
    """The segmentation as mmdet uses it, or None where mmdet ignores the object (no valid polygon, bad RLE)."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) % 2 == 0 and len(p) >= 6]
        return polygons or None
    if isinstance(segmentation, dict) and isinstance(segmentation.get('counts'), (list, str)) \
            and segmentation.get('size') is not None:
        return segmentation
    return None


def read_coco_detection(annotation_file: str, images_dir: str, train: bool = True, pipeline='default',
                        seed: int = 0) -> DetectionDataset:
    """A ``DetectionDataset`` of a COCO instances json and its image folder.

    Labels are the categories in increasing id order. ``train``: images without annotations and images under
    32 px are dropped (one with only crowd objects stays, as in mmdet), and ``pipeline='default'`` is the
    published training pipeline (else the published test resize; ``None``: the image as read). Masks are
    read when any annotation has a ``segmentation``; without any, the dataset is boxes only. Bad annotations
    raise one line naming the first offending image or annotation.
    """
    data = _read_json(annotation_file)
    where = os.path.basename(annotation_file)
    categories = {}
    for category in data['categories']:
        if not isinstance(category, dict) or 'id' not in category:
            raise ValueError(f'{where}: category {category!r} has no "id"')
        categories[int(category['id'])] = str(category.get('name', category['id']))
    category_ids = sorted(categories)
    label_of = {c: i for i, c in enumerate(category_ids)}

    images = {}
    for image in data['images']:
        try:
            image_id, file_name = image['id'], image['file_name']
            height, width = int(image['height']), int(image['width'])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f'{where}: image entry {image!r:.200} lacks an id, file_name, height or width') from None
        if height <= 0 or width <= 0:
            raise ValueError(f'{where}: image {image_id} ({file_name}) has size {height}x{width}; '
                             f'expected a positive height and width')
        images[image_id] = (file_name, height, width)
    with_masks = any(a.get('segmentation') for a in data['annotations'] if isinstance(a, dict))

    objects: Dict[object, List[tuple]] = {i: [] for i in images}  # image id -> (box, label, segmentation)s
    annotated = set()
    notes = _Notes(where)
    for ann in data['annotations']:
        if not isinstance(ann, dict):
            raise ValueError(f'{where}: annotation entry {ann!r:.100} is not an object')
        ann_id = ann.get('id')
        if ann.get('image_id') not in images:
            raise ValueError(f'{where}: annotation {ann_id} refers to image {ann.get("image_id")!r}, '
                             f'which is not in "images"')
        if ann.get('category_id') not in label_of:
            raise ValueError(f'{where}: annotation {ann_id} (image {ann["image_id"]}) has unknown category id '
                             f'{ann.get("category_id")!r}; the categories are {category_ids}')
        box = ann.get('bbox')
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ValueError(f'{where}: annotation {ann_id} (image {ann["image_id"]}) has bbox {box!r}; '
                             f'expected [x, y, width, height]')
        x, y, w, h = box
        if w < 0 or h < 0:
            raise ValueError(f'{where}: annotation {ann_id} (image {ann["image_id"]}) has a negative box size '
                             f'{w}x{h}; expected [x, y, width, height] with width, height >= 0')
        annotated.add(ann['image_id'])
        file_name, height, width = images[ann['image_id']]
        what = f'annotation {ann_id} of {file_name}'
        inter_w = max(0, min(x + w, width) - max(x, 0))
        inter_h = max(0, min(y + h, height) - max(y, 0))
        if ann.get('ignore', False) or ann.get('iscrowd', False):
            continue
        if inter_w * inter_h == 0 or ann.get('area', w * h) <= 0 or w < 1 or h < 1:
            notes.dropped.append(what)
            continue
        segmentation = None
        if with_masks:
            segmentation = _usable_segmentation(ann.get('segmentation'))
            if segmentation is None:
                notes.dropped.append(what)
                continue
        box = _clip_box(x, y, x + w, y + h, width, height, what, notes)
        objects[ann['image_id']].append((box, label_of[ann['category_id']], segmentation))

    records = [_record(image_id, os.path.join(images_dir, file_name), height, width, objects[image_id], with_masks)
               for image_id, (file_name, height, width) in images.items()]
    _check_files_exist(records, images_dir)
    notes.warn()
    if train:
        records = _keep_for_training(records, [r.image_id in annotated for r in records])
    return DetectionDataset(records, [categories[c] for c in category_ids], category_ids, with_masks,
                            _default_pipeline(pipeline, train), seed, annotation_file)


def _record(image_id, path, height, width, objects, with_masks) -> ImageRecord:
    boxes = np.array([o[0] for o in objects], np.float32).reshape(-1, 4)
    labels = np.array([o[1] for o in objects], np.int64)
    segmentations = tuple(o[2] for o in objects) if with_masks else None
    return ImageRecord(image_id, path, height, width, boxes, labels, segmentations)


def _check_files_exist(records: Sequence[ImageRecord], images_dir: str) -> None:
    missing = [r.path for r in records if not os.path.isfile(r.path)]
    if missing:
        raise FileNotFoundError(f'{len(missing)} of the {len(records)} images of the annotations are not in '
                                f'{images_dir} (first: {missing[0]})')


def _default_pipeline(pipeline, train: bool):
    if isinstance(pipeline, str) and pipeline == 'default':
        return DetectionTrainPipeline() if train else DetectionTestPipeline()
    return pipeline


# ---------------------------------------------------------------------------------------------
# YOLO format (ultralytics / Roboflow layout)


def _yolo_names(config: dict, yaml_path: str) -> List[str]:
    names = config.get('names')
    if isinstance(names, dict):
        try:
            names = [names[i] for i in range(len(names))]
        except KeyError:
            raise ValueError(f'{yaml_path}: "names" must map 0..{len(names) - 1} to class names') from None
    if not isinstance(names, list) or not names:
        raise ValueError(f'{yaml_path}: expected "names", a list of class names (or a map from 0, 1, ...)')
    return [str(n) for n in names]


def _yolo_images_dir(config: dict, yaml_path: str, split: str) -> str:
    """The images folder of ``split`` ('train' or 'val'): the yaml's entry, else images/SPLIT or SPLIT/images."""
    root = os.path.dirname(os.path.abspath(yaml_path))
    base = os.path.join(root, config['path']) if isinstance(config.get('path'), str) else root
    keys = ('val', 'valid', 'validation') if split in ('val', 'valid', 'validation') else (split,)
    candidates = []
    for key in keys:
        entry = config.get(key)
        if isinstance(entry, str):
            candidates += [os.path.join(base, entry), os.path.join(root, entry)]
            if entry.startswith('../'):  # Roboflow writes ../train/images beside the yaml
                candidates.append(os.path.join(root, entry[3:]))
        candidates += [os.path.join(root, 'images', key), os.path.join(root, key, 'images')]
    for candidate in candidates:
        if os.path.isdir(candidate):
            return os.path.normpath(candidate)
    raise FileNotFoundError(f'{yaml_path}: no image folder for split {split!r} (tried {", ".join(candidates)})')


def _yolo_label_path(image_path: str) -> str:
    """Ultralytics' rule: the last 'images' folder of the path becomes 'labels', the extension '.txt'."""
    head, sep, tail = image_path.rpartition(os.sep + 'images' + os.sep)
    path = head + os.sep + 'labels' + os.sep + tail if sep else image_path
    return os.path.splitext(path)[0] + '.txt'


def _read_yolo_labels(label_path: str, num_classes: int) -> List[Tuple[int, List[float]]]:
    if not os.path.isfile(label_path):
        return []  # an image without a label file is background, as ultralytics reads it
    objects = []
    with open(label_path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                values = [float(v) for v in fields]
            except ValueError:
                raise ValueError(f'{label_path}:{number}: expected numbers "class cx cy w h" or '
                                 f'"class x1 y1 x2 y2 ...", got {line.strip()!r}') from None
            cls = values[0]
            if cls != int(cls) or not 0 <= cls < num_classes:
                raise ValueError(f'{label_path}:{number}: unknown class id {fields[0]}; data.yaml names '
                                 f'{num_classes} classes (0..{num_classes - 1})')
            coords = values[1:]
            if len(coords) != 4 and (len(coords) < 6 or len(coords) % 2):
                raise ValueError(f'{label_path}:{number}: expected "class cx cy w h" or a polygon '
                                 f'"class x1 y1 x2 y2 x3 y3 ...", got {len(fields)} values')
            if len(coords) == 4 and (coords[2] <= 0 or coords[3] <= 0):
                raise ValueError(f'{label_path}:{number}: box size {coords[2]}x{coords[3]}; expected a positive '
                                 f'normalised width and height')
            objects.append((int(cls), coords))
    return objects


def read_yolo_detection(path: str, split: str = 'train', train: Optional[bool] = None, pipeline='default',
                        seed: int = 0) -> DetectionDataset:
    """A ``DetectionDataset`` of a YOLO-format dataset: ``path`` is its ``data.yaml`` or the folder holding it.

    Label files hold ``class cx cy w h`` (normalised boxes) or ``class x1 y1 x2 y2 ...`` (normalised polygons:
    masks, and the polygon's extent as box). When every object of the split is a polygon the dataset has
    masks; when only some are, it is read as boxes only (with a warning), as ultralytics does.
    ``train`` defaults to ``split == 'train'`` (filtering and pipeline as ``read_coco_detection``).
    """
    import yaml
    yaml_path = os.path.join(path, 'data.yaml') if os.path.isdir(path) else path
    if not os.path.isfile(yaml_path):
        raise FileNotFoundError(f'YOLO dataset description {yaml_path} not found')
    try:
        with open(yaml_path, encoding='utf-8') as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f'{yaml_path}: unreadable YAML ({type(e).__name__})') from None
    if not isinstance(config, dict):
        raise ValueError(f'{yaml_path}: expected a mapping with "names" and the split folders')
    names = _yolo_names(config, yaml_path)
    train = split == 'train' if train is None else train
    images_dir = _yolo_images_dir(config, yaml_path, split)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(images_dir) for f in fs
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f'{images_dir}: no images ({", ".join(IMAGE_EXTENSIONS)})')
    parsed = [(p, image_file_size(p), _read_yolo_labels(_yolo_label_path(p), len(names))) for p in files]
    kinds = {len(coords) == 4 for _, _, objects in parsed for _, coords in objects}
    with_masks = kinds == {False}
    if kinds == {True, False}:
        warnings.warn(f'{images_dir}: some objects are boxes and some polygons; read as boxes only '
                      f'(as ultralytics does)', stacklevel=2)
    notes = _Notes(images_dir)
    records = []
    for image_id, (image_path, (height, width), objects) in enumerate(parsed):
        kept = []
        for number, (cls, coords) in enumerate(objects, 1):
            what = f'object {number} of {_yolo_label_path(image_path)}'
            if len(coords) == 4:
                cx, cy, w, h = coords
                x1, x2 = (cx - w / 2) * width, (cx + w / 2) * width
                y1, y2 = (cy - h / 2) * height, (cy + h / 2) * height
                segmentation = None
            else:
                xs, ys = np.array(coords[0::2]) * width, np.array(coords[1::2]) * height
                x1, y1, x2, y2 = xs.min(), ys.min(), xs.max(), ys.max()
                segmentation = [np.stack([xs, ys], 1).reshape(-1).tolist()] if with_masks else None
            if min(x2, width) - max(x1, 0) <= 0 or min(y2, height) - max(y1, 0) <= 0 or x2 - x1 < 1 or y2 - y1 < 1:
                notes.dropped.append(what)
                continue
            kept.append((_clip_box(x1, y1, x2, y2, width, height, what, notes), cls, segmentation))
        records.append(_record(image_id, image_path, height, width, kept, with_masks))
    notes.warn()
    if train:
        records = _keep_for_training(records, [len(r.labels) > 0 for r in records])
    return DetectionDataset(records, names, range(len(names)), with_masks, _default_pipeline(pipeline, train), seed)


def detection_dataset(data_dir: Optional[str] = None, split: str = 'train', *, annotation_file: Optional[str] = None,
                      images_dir: Optional[str] = None, train: Optional[bool] = None, pipeline='default',
                      seed: int = 0) -> DetectionDataset:
    """The ``split`` of a detection dataset, its format recognised: explicit ``annotation_file`` and
    ``images_dir`` (COCO); ``data_dir`` with a ``data.yaml`` (YOLO); or ``data_dir`` holding ``SPLIT.json``
    beside the image folder ``SPLIT/`` (COCO). ``train`` defaults to ``split == 'train'``."""
    train = split == 'train' if train is None else train
    if annotation_file is not None or images_dir is not None:
        if annotation_file is None or images_dir is None:
            raise ValueError('give both annotation_file and images_dir for a COCO dataset, or data_dir')
        return read_coco_detection(annotation_file, images_dir, train, pipeline, seed)
    if data_dir is None:
        raise ValueError('expected data_dir (a COCO or YOLO dataset folder), or annotation_file and images_dir')
    if os.path.isfile(os.path.join(data_dir, 'data.yaml')):
        return read_yolo_detection(data_dir, split, train, pipeline, seed)
    annotation_file = os.path.join(data_dir, f'{split}.json')
    if os.path.isfile(annotation_file):
        return read_coco_detection(annotation_file, os.path.join(data_dir, split), train, pipeline, seed)
    raise FileNotFoundError(f'{data_dir}: neither a COCO dataset ({split}.json beside the image folder {split}/) '
                            f'nor a YOLO dataset (data.yaml with images/ and labels/ folders)')
