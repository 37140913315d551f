"""Dataset readers and metrics of the published ADE20K and COCO evaluations, without mm* packages.

Semantic segmentation follows mmseg's ``IoUMetric``: per image the areas of intersection,
union, prediction and ground truth per class (pixels labelled ``ignore_index`` left out),
summed over the dataset; aAcc, IoU and Acc are ratios of the sums, and mIoU / mAcc the
means over the classes that have a defined value (a class absent from both prediction
and ground truth has IoU nan and is left out, like ``np.nanmean``). ADE20K labels are read
as mmseg's ``LoadAnnotations(reduce_zero_label=True)`` reads them: 0 ("other") becomes 255
(ignored), every other label is shifted down by one.

Instance segmentation follows mmdet's ``CocoMetric``: detections become COCO results
(``bbox`` as x, y, width, height, masks as pycocotools RLE, label i -> the i-th smallest
category id), and pycocotools' ``COCOeval`` gives AP, AP50, AP75 and AP for small, medium
and large objects with mmdet's settings (max detections 100/300/1000, every image of the
annotation file), in percent as the segmentation metrics. pycocotools is an optional dependency:
``pip install pycocotools`` (the ``coco`` extra).
"""
import contextlib
import copy
import io
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    'COCO_CATEGORY_IDS', 'intersect_and_union', 'segmentation_metrics', 'ade20k_samples', 'read_ade20k_label',
    'import_pycocotools', 'load_coco', 'coco_image_paths', 'coco_results', 'coco_evaluate',
    'evaluate_segmenter', 'evaluate_detector',
]

IGNORE_INDEX = 255
# The category ids of COCO's 80 classes in the order of the class names (the official ids run 1..90 with gaps).
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
AP_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')  # COCOeval.stats[0:6]


# ---------------------------------------------------------------------------------------------
# semantic segmentation


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-class pixel counts of one image: (4, num_classes) int64 rows intersection, union, prediction, label.

    ``pred`` and ``label`` are (H, W) integer maps; pixels where ``label == ignore_index`` are not counted.
    """
    if pred.shape != label.shape:
        raise ValueError(f'prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in size')
    keep = label != ignore_index
    pred, label = pred[keep].long(), label[keep].long()
    area_intersect = torch.bincount(pred[pred == label], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred, minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    return torch.stack([area_intersect, area_pred + area_label - area_intersect, area_pred, area_label])


def segmentation_metrics(areas: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """aAcc, mIoU, mAcc (percent) and per-class IoU / Acc from the summed ``intersect_and_union`` counts.

    Per-class values of classes without pixels are None (nan in mmseg) and left out of the means.
    """
    intersect, union, _, label = areas.double()
    iou, acc = (intersect / union).numpy(), (intersect / label).numpy()
    names = class_names or [str(i) for i in range(len(iou))]
    return dict(
        aAcc=100 * float(intersect.sum() / label.sum()), mIoU=100 * float(np.nanmean(iou)),
        mAcc=100 * float(np.nanmean(acc)),
        per_class={name: dict(IoU=None if np.isnan(i) else 100 * float(i), Acc=None if np.isnan(a) else 100 * float(a))
                   for name, i, a in zip(names, iou, acc)})


def ade20k_samples(data_dir: str, split: str = 'validation') -> List[Tuple[str, str]]:
    """Sorted (image, annotation) paths of ``data_dir/images/<split>/*.jpg`` and ``annotations/<split>/*.png``."""
    root = Path(data_dir)
    images_dir, annotations_dir = root / 'images' / split, root / 'annotations' / split
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f'{folder} not found: expected the ADE20K layout DIR/images/{split}/*.jpg and '
                                    f'DIR/annotations/{split}/*.png (ADEChallengeData2016)')
    images = sorted(images_dir.rglob('*.jpg'))
    if not images:
        raise FileNotFoundError(f'no .jpg images in {images_dir}')
    samples = []
    for image in images:
        annotation = annotations_dir / image.relative_to(images_dir).with_suffix('.png')
        if not annotation.is_file():
            raise FileNotFoundError(f'annotation {annotation} of image {image} not found')
        samples.append((str(image), str(annotation)))
    return samples


def read_ade20k_label(path: str) -> np.ndarray:
    """(H, W) uint8 class map of an ADE20K annotation PNG: 0 ("other") and 255 -> 255 (ignored), k -> k - 1."""
    from PIL import Image

    with Image.open(path) as image:
        label = np.array(image).squeeze().astype(np.uint8)
    if label.ndim != 2:
        raise ValueError(f'{path}: expected a single-channel label map, got shape {label.shape}')
    label = np.where(label == 0, IGNORE_INDEX, label - 1).astype(np.uint8)
    label[label == IGNORE_INDEX - 1] = IGNORE_INDEX  # a label 255 in the file stays ignored, as in mmseg
    return label


# ---------------------------------------------------------------------------------------------
# COCO


def import_pycocotools():
    """The ``pycocotools`` modules (COCO, COCOeval, mask), or an ImportError naming the extra that installs them."""
    try:
        from pycocotools import mask
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("COCO evaluation needs pycocotools: pip install pycocotools "
                          "(in a checkout of mambavision: pip install -e '.[coco]')") from None
    return COCO, COCOeval, mask


def load_coco(annotation_file: str):
    """A ``pycocotools.coco.COCO`` of an instances json (its loading messages silenced)."""
    coco_cls = import_pycocotools()[0]
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f'COCO annotation file {annotation_file} not found (expected an instances json)')
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return coco_cls(annotation_file)
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise ValueError(f'{annotation_file} is not a COCO instances json ({type(e).__name__}: {e})') from None


def coco_image_paths(coco, images_dir: str) -> Dict[int, str]:
    """Image id -> path of every image of ``coco`` under ``images_dir`` (its ``file_name``), all checked to exist."""
    paths = {i: os.path.join(images_dir, coco.imgs[i]['file_name']) for i in sorted(coco.getImgIds())}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f'{len(missing)} of the {len(paths)} images of the annotations are not in {images_dir} '
                                f'(first: {missing[0]})')
    return paths


def coco_results(detections: Sequence[dict], image_ids: Sequence[int], category_ids: Sequence[int]) -> List[dict]:
    """COCO results of per-image detections (``boxes`` x1 y1 x2 y2, ``scores``, ``labels``, optional ``masks``).

    One entry per detection: ``image_id``, ``category_id`` (``category_ids[label]``), ``bbox`` [x, y, w, h],
    ``score`` and, with masks, ``segmentation`` as an RLE with a str ``counts``.
    """
    rle_encode = import_pycocotools()[2].encode if any('masks' in d for d in detections) else None
    results = []
    for image_id, det in zip(image_ids, detections):
        boxes = det['boxes'].tolist()
        for i, (score, label) in enumerate(zip(det['scores'].tolist(), det['labels'].tolist())):
            x1, y1, x2, y2 = boxes[i]
            entry = dict(image_id=int(image_id), category_id=int(category_ids[label]),
                         bbox=[x1, y1, x2 - x1, y2 - y1], score=score)
            if 'masks' in det:
                assert rle_encode is not None  # set above whenever a detection has masks
                rle = rle_encode(np.asfortranarray(np.asarray(det['masks'][i], dtype=np.uint8)))
                entry['segmentation'] = dict(size=rle['size'], counts=rle['counts'].decode())
            results.append(entry)
    return results


def coco_evaluate(coco, results: Sequence[dict], iou_type: str, per_class: bool = False) -> Dict[str, object]:
    """AP, AP50, AP75, APs, APm, APl (percent, -1 where no ground truth) of ``results`` for 'bbox' or 'segm';
    with ``per_class`` also ``per_class``: category name -> AP (percent, None where it has no ground truth), the
    precision averaged over IoU thresholds and recall points as mmdet's ``classwise`` table.

    As mmdet evaluates masks, their ``bbox`` is dropped so that pycocotools takes the object areas from the masks.
    """
    _, coco_eval_cls, _ = import_pycocotools()
    results = [{k: v for k, v in r.items() if not (iou_type == 'segm' and k == 'bbox')} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco.loadRes(results)
        else:  # pycocotools cannot load an empty list
            coco_dt = type(coco)()
            coco_dt.dataset = dict(images=coco.dataset['images'], categories=copy.deepcopy(coco.dataset['categories']),
                                   annotations=[])
            coco_dt.createIndex()
        evaluator = coco_eval_cls(coco, coco_dt, iou_type)
        evaluator.params.catIds = sorted(coco.getCatIds())
        evaluator.params.imgIds = sorted(coco.getImgIds())
        evaluator.params.maxDets = [100, 300, 1000]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics: Dict[str, object] = {name: _percent(value) for name, value in zip(AP_NAMES, evaluator.stats[:6])}
    if per_class:
        precision = evaluator.eval['precision']  # (IoU thresholds, recall points, classes, areas, max detections)
        metrics['per_class'] = {}
        for k, category_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            name = coco.cats[int(category_id)]['name']
            metrics['per_class'][name] = _percent(p[p > -1].mean()) if (p > -1).any() else None
    return metrics


def _percent(value: float) -> float:
    """A pycocotools statistic (0..1, or -1 for 'no ground truth') in percent (-1 kept)."""
    return 100 * float(value) if value >= 0 else -1.0


# ---------------------------------------------------------------------------------------------
# a model over a dataset


def _predict_file(model, path: str, autocast, **options) -> dict:
    from .image import read_image_file

    with torch.inference_mode(), autocast():
        return model.predict(read_image_file(path), **options)[0]


def evaluate_segmenter(
        model, samples: Sequence[Tuple[str, str]], read_label: Callable[[str], np.ndarray] = read_ade20k_label,
        autocast=contextlib.nullcontext, progress: Callable[[Iterable], Iterable] = iter,
        per_class: bool = False) -> Dict[str, object]:
    """aAcc, mIoU, mAcc (percent), and with ``per_class`` each class's IoU / Acc, of a segmenter on
    (image file, label file) pairs.

    Each image runs through ``model.predict`` (the published test protocol); labels are read with
    ``read_label`` (ADE20K's reduce-zero-label reading by default). ``autocast`` makes the context of
    each forward, ``progress`` wraps the loop (a progress bar).
    """
    areas = torch.zeros(4, len(model.class_names), dtype=torch.int64)
    for image_path, label_path in progress(samples):
        label = torch.from_numpy(read_label(label_path))
        pred = _predict_file(model, image_path, autocast, return_logits=False)['labels'].cpu()
        if pred.shape != label.shape:
            raise ValueError(f'{label_path} is {tuple(label.shape)}, its image {image_path} {tuple(pred.shape)}')
        areas += intersect_and_union(pred, label, len(model.class_names))
    metrics = segmentation_metrics(areas, model.class_names)
    if not per_class:
        del metrics['per_class']
    return dict(images=len(samples), **metrics)


def evaluate_detector(model, coco, image_paths: Dict[int, str], autocast=contextlib.nullcontext,
                      progress: Callable[[Iterable], Iterable] = iter, per_class: bool = False) -> Dict[str, object]:
    """COCO box and mask AP (percent; with ``per_class`` also each category's AP) of a detector on the images of
    ``coco`` (image id -> file, ``coco_image_paths``).

    Label i of the model is the i-th smallest category id of ``coco``; both must count the same classes.
    """
    category_ids = sorted(coco.getCatIds())
    if len(category_ids) != len(model.class_names):
        raise ValueError(f'the annotations have {len(category_ids)} categories, the model {len(model.class_names)} '
                         f'classes')
    results = []
    for image_id, path in progress(image_paths.items()):
        detections = {k: v.cpu() for k, v in _predict_file(model, path, autocast).items()}
        results += coco_results([detections], [image_id], category_ids)
    return dict(images=len(image_paths), detections=len(results),
                bbox=coco_evaluate(coco, results, 'bbox', per_class),
                segm=coco_evaluate(coco, results, 'segm', per_class))
