"""Training targets of the detector, with mmdet 3.3.0's arithmetic: which anchors and proposals learn what.

``MaxIoUAssigner`` matches candidate boxes to the ground truth, ``RandomSampler`` picks the
positives and negatives a loss sees, ``mask_targets`` crops the ground-truth masks to the positive
boxes. ``train_config`` holds the published training settings under mmdet's names (``rpn``,
``rpn_proposal``, ``rcnn``), which a user's overrides change key by key.
"""
import copy
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = [
    'MaxIoUAssigner', 'RandomSampler', 'Sampling', 'assign_and_sample', 'batch_targets', 'box_iou', 'check_targets',
    'inside_image', 'mask_targets', 'stage_parts', 'train_config', 'DEFAULT_TRAIN_CFG',
]


def _assigner(pos: float, neg: float, min_pos: float, low_quality: bool) -> dict:
    return dict(pos_iou_thr=pos, neg_iou_thr=neg, min_pos_iou=min_pos, match_low_quality=low_quality,
                gt_max_assign_all=True)


def _rcnn_stage(iou: float) -> dict:
    return dict(
        assigner=_assigner(iou, iou, iou, False),
        sampler=dict(num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
        mask_size=28, pos_weight=-1)


# The published Cascade Mask R-CNN's training settings (mmdet's cascade-mask-rcnn base config), mmdet's names.
DEFAULT_TRAIN_CFG: Dict[str, Any] = dict(
    rpn=dict(
        assigner=_assigner(0.7, 0.3, 0.3, True),
        sampler=dict(num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
        allowed_border=0, pos_weight=-1),
    rpn_proposal=dict(nms_pre=2000, max_per_img=2000, nms=dict(iou_threshold=0.7), min_bbox_size=0),
    rcnn=[_rcnn_stage(0.5), _rcnn_stage(0.6), _rcnn_stage(0.7)],
)
_IGNORED_KEYS = {'type', 'debug', 'ignore_iof_thr'}  # mmdet's config names that change nothing here


def _merge(default: Any, override: Any, path: str) -> Any:
    """``default`` with ``override``'s entries put in, checking every key exists in ``default``."""
    if isinstance(default, dict):
        if not isinstance(override, dict):
            raise ValueError(f'train_cfg: {path or "train_cfg"} must be a dict, got {override!r}')
        merged = copy.deepcopy(default)
        for key, value in override.items():
            if key in _IGNORED_KEYS and key not in default:
                continue
            if key not in default:
                raise ValueError(f'train_cfg: unknown setting {path + key!r}; known: {", ".join(default)}')
            merged[key] = _merge(default[key], value, f'{path}{key}.')
        return merged
    if isinstance(default, list):
        if not isinstance(override, (list, tuple)) or len(override) != len(default):
            raise ValueError(f'train_cfg: {path[:-1]} needs {len(default)} entries, got {override!r}')
        return [_merge(d, o, f'{path[:-1]}[{i}].') for i, (d, o) in enumerate(zip(default, override))]
    return override


def _set_dotted(cfg: Dict[str, Any], name: str, value: Any) -> None:
    """In place: the setting at mmengine's dotted ``name`` ('rcnn.0.sampler.num': list items by index) = value."""
    parts = name.split('.')
    node: Any = cfg
    for depth, part in enumerate(parts):
        key: Any = int(part) if isinstance(node, list) and part.isdigit() else part
        if isinstance(node, list) and not (isinstance(key, int) and key < len(node)) or (
                isinstance(node, dict) and key not in node) or not isinstance(node, (dict, list)):
            raise ValueError(f'train_cfg: unknown setting {name!r}')
        if depth == len(parts) - 1:
            node[key] = _merge(node[key], value, name + '.')
        node = node[key]


def train_config(overrides: Optional[dict] = None) -> Dict[str, Any]:
    """The published training settings with ``overrides`` (mmdet's names) put in.

    Nested, e.g. ``{'rpn': {'sampler': {'num': 512}}, 'rcnn': [{'sampler': {'num': 10**6}}] * 3}``, or
    dotted as mmengine's ``--cfg-options`` writes them, e.g. ``{'rcnn.0.sampler.num': 1024}``; mmdet's
    ``type``/``debug``/``ignore_iof_thr`` entries are accepted and mean nothing here.
    """
    overrides = overrides or {}
    cfg = _merge(DEFAULT_TRAIN_CFG, {k: v for k, v in overrides.items() if '.' not in k}, '')
    for name, value in overrides.items():
        if '.' in name:
            _set_dotted(cfg, name, value)
    return cfg


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """mmdet's bbox_overlaps (iou): (N, 4), (M, 4) x1 y1 x2 y2 -> (N, M), the union at least ``eps``."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (area1[:, None] + area2[None, :] - overlap).clamp(min=eps)
    return overlap / union


@dataclass
class MaxIoUAssigner:
    """mmdet's MaxIoUAssigner: each candidate box to the ground truth it overlaps most.

    A candidate is negative below ``neg_iou_thr``, positive from ``pos_iou_thr``, and ignored in
    between; with ``match_low_quality`` every ground-truth box also takes the candidates it overlaps
    most (all of them on ties with ``gt_max_assign_all``) when that overlap reaches ``min_pos_iou``.
    """

    pos_iou_thr: float
    neg_iou_thr: float
    min_pos_iou: float = 0.
    match_low_quality: bool = True
    gt_max_assign_all: bool = True

    def __call__(self, candidates: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4) candidates, (G, 4) ground truth -> (N,) int64: -1 ignored, 0 negative, i + 1 matched to box i."""
        gt_inds = torch.full((len(candidates),), -1, dtype=torch.long, device=candidates.device)
        if len(gt_boxes) == 0 or len(candidates) == 0:
            return gt_inds.zero_() if len(gt_boxes) == 0 else gt_inds
        overlaps = box_iou(gt_boxes, candidates)
        max_overlaps, argmax_overlaps = overlaps.max(dim=0)
        gt_inds[(max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)] = 0
        positive = max_overlaps >= self.pos_iou_thr
        gt_inds[positive] = argmax_overlaps[positive] + 1
        if self.match_low_quality:
            gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=1)
            if self.gt_max_assign_all:
                best = overlaps == gt_max_overlaps[:, None]
            else:
                best = torch.zeros_like(overlaps, dtype=torch.bool)
                best[torch.arange(len(gt_boxes), device=best.device), gt_argmax_overlaps] = True
            best &= (gt_max_overlaps >= self.min_pos_iou)[:, None]
            # mmdet goes through the boxes in order, so the last box that overlaps a candidate most wins it
            last = (best * torch.arange(1, len(gt_boxes) + 1, device=best.device)[:, None]).max(dim=0).values
            gt_inds = torch.where(last > 0, last, gt_inds)
        return gt_inds


@dataclass
class RandomSampler:
    """mmdet's RandomSampler: up to ``num`` candidates, at most ``pos_fraction`` of them positive.

    Negatives fill the rest (at most ``neg_pos_ub`` per positive when that is >= 0). When a kind has
    no more candidates than wanted, all are taken, in order; otherwise a random subset (drawn with
    ``generator``), returned sorted as mmdet's ``unique`` returns it. ``add_gt_as_proposals``: the
    ground-truth boxes join the candidates as positives of themselves (see ``assign_and_sample``).
    """

    num: int
    pos_fraction: float
    neg_pos_ub: float = -1
    add_gt_as_proposals: bool = True

    @staticmethod
    def _choose(inds: torch.Tensor, num: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        if len(inds) <= num:
            return inds
        perm = torch.randperm(len(inds), generator=generator, device='cpu')[:num].to(inds.device)
        return inds[perm].sort().values

    def __call__(
            self, gt_inds: torch.Tensor, generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N,) assignment (-1 ignored, 0 negative, > 0 positive) -> sorted positive and negative indices."""
        pos = self._choose((gt_inds > 0).nonzero().squeeze(1), int(self.num * self.pos_fraction), generator)
        num_neg = self.num - len(pos)
        if self.neg_pos_ub >= 0:
            num_neg = min(num_neg, int(self.neg_pos_ub * max(1, len(pos))))
        neg = self._choose((gt_inds == 0).nonzero().squeeze(1), num_neg, generator)
        return pos, neg


class Sampling(NamedTuple):
    """The candidates one loss sees in one image (mmdet's SamplingResult).

    candidates: (N, 4) the ground-truth boxes first when the sampler adds them, then the priors.
    pos_inds, neg_inds: (P,), (Q,) sorted indices into ``candidates``.
    pos_gt_inds: (P,) the ground-truth box each positive is matched to.
    num_gt_candidates: how many leading candidates are ground-truth boxes.
    """

    candidates: torch.Tensor
    pos_inds: torch.Tensor
    neg_inds: torch.Tensor
    pos_gt_inds: torch.Tensor
    num_gt_candidates: int

    @property
    def avg_factor(self) -> int:
        """mmdet's avg_factor of a sampling: positives + negatives, each counted as at least 1."""
        return max(len(self.pos_inds), 1) + max(len(self.neg_inds), 1)

    @property
    def pos_is_gt(self) -> torch.Tensor:
        """(P,) bool: the positive is a ground-truth box added as a candidate."""
        return self.pos_inds < self.num_gt_candidates

    def sampled(self) -> torch.Tensor:
        """(P + Q, 4) the positives then the negatives."""
        return torch.cat([self.candidates[self.pos_inds], self.candidates[self.neg_inds]])


def assign_and_sample(
        priors: torch.Tensor, gt_boxes: torch.Tensor, assigner: MaxIoUAssigner, sampler: RandomSampler,
        generator: Optional[torch.Generator] = None,
) -> Sampling:
    """Assign (N, 4) priors to (G, 4) ground truth, add the ground truth as candidates if the sampler
    says so (after assigning, as mmdet does), and sample."""
    gt_inds = assigner(priors, gt_boxes)
    num_gt_candidates = 0
    if sampler.add_gt_as_proposals and len(gt_boxes):
        num_gt_candidates = len(gt_boxes)
        priors = torch.cat([gt_boxes.to(priors.dtype), priors])
        gt_inds = torch.cat([torch.arange(1, len(gt_boxes) + 1, device=gt_inds.device), gt_inds])
    pos_inds, neg_inds = sampler(gt_inds, generator)
    return Sampling(priors, pos_inds, neg_inds, gt_inds[pos_inds] - 1, num_gt_candidates)


def inside_image(anchors: torch.Tensor, image_size: Tuple[int, int], allowed_border: float = 0) -> torch.Tensor:
    """(N, 4) anchors -> (N,) bool: inside the (h, w) image up to ``allowed_border`` pixels (all when < 0)."""
    if allowed_border < 0:
        return torch.ones(len(anchors), dtype=torch.bool, device=anchors.device)
    h, w = image_size
    return ((anchors[:, 0] >= -allowed_border) & (anchors[:, 1] >= -allowed_border)
            & (anchors[:, 2] < w + allowed_border) & (anchors[:, 3] < h + allowed_border))


def mask_targets(
        masks: torch.Tensor, boxes: torch.Tensor, gt_inds: torch.Tensor, mask_size: int = 28,
) -> torch.Tensor:
    """mmdet's mask_target (BitmapMasks.crop_and_resize): each box's ground-truth mask resampled to the box.

    Args:
        masks: (G, h, w) binary masks at the image's size.
        boxes: (P, 4) x1 y1 x2 y2 boxes, clipped to the mask's size first.
        gt_inds: (P,) the mask of each box.

    Returns:
        (P, mask_size, mask_size) float 0/1: RoIAlign (aligned, adaptive sampling) of the mask at >= 0.5.
    """
    if len(boxes) == 0:
        return boxes.new_zeros(0, mask_size, mask_size)
    h, w = masks.shape[-2:]
    boxes = boxes.detach().float()
    boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                         boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)
    rois = torch.cat([gt_inds[:, None].to(boxes), boxes], dim=1)
    resized = roi_align(masks[:, None].to(boxes), rois, mask_size, 1.0, sampling_ratio=0, aligned=True)
    return (resized[:, 0] >= 0.5).to(boxes)


def stage_parts(cfg: dict) -> Tuple[MaxIoUAssigner, RandomSampler]:
    """A training stage's settings (mmdet's names) -> its assigner and sampler."""
    return MaxIoUAssigner(**cfg['assigner']), RandomSampler(**cfg['sampler'])



def check_targets(targets, num_images: int, padded_size: Sequence[int], num_classes: int) -> list:
    """Training targets in torchvision's form, checked: one dict per image with ``boxes`` (N, 4), ``labels``
    (N,) in 0..num_classes-1, ``image_size`` (h, w) within the padded batch and ``masks`` (N, h, w) in
    every image or in none. Returns the image sizes; a bad entry raises one line naming it."""
    if len(targets) != num_images:
        raise ValueError(f'targets needs one dict per image: got {len(targets)} for a batch of {num_images}')
    with_masks = 'masks' in targets[0] if targets else False
    sizes = []
    for i, target in enumerate(targets):
        missing = [k for k in ('boxes', 'labels', 'image_size') if k not in target]
        if missing:
            raise ValueError(f'targets[{i}] has no {", ".join(missing)}: expected boxes, labels, image_size [, masks]')
        boxes, labels = target['boxes'], target['labels']
        h, w = (int(v) for v in target['image_size'])
        if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != (len(boxes),):
            raise ValueError(f'targets[{i}]: boxes must be (N, 4) and labels (N,), got {tuple(boxes.shape)} '
                             f'and {tuple(labels.shape)}')
        if len(labels) and (labels.is_floating_point() or labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f'targets[{i}]: labels must be integers in 0..{num_classes - 1}, got {labels.tolist()}')
        if not (0 < h <= padded_size[0] and 0 < w <= padded_size[1]):
            raise ValueError(f'targets[{i}]: image_size {(h, w)} is not inside the padded batch {tuple(padded_size)}')
        if ('masks' in target) != with_masks:
            raise ValueError(f'targets[{i}]: masks must be given for every image of a batch or for none')
        if with_masks and tuple(target['masks'].shape) != (len(boxes), h, w):
            raise ValueError(f'targets[{i}]: masks must be (N, h, w) = {(len(boxes), h, w)}, '
                             f'got {tuple(target["masks"].shape)}')
        sizes.append((h, w))
    return sizes


def batch_targets(targets, inputs: torch.Tensor) -> list:
    """Checked targets on ``inputs``' device (labels int64, masks uint8), the masks zero-padded to the
    batch's (H, W) as mmdet's DetDataPreprocessor pads them with the images (``pad_mask``): RoIAlign of
    a mask touching the image's right or bottom edge then reads zeros beyond it, as in mmdet's
    training. New dicts."""
    height, width = inputs.shape[-2:]
    out = []
    for target in targets:
        target = {k: v.to(inputs.device) if torch.is_tensor(v) else v for k, v in target.items()}
        target['labels'] = target['labels'].long()
        if 'masks' in target:
            masks = target['masks'].to(torch.uint8)
            target['masks'] = F.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2]))
        out.append(target)
    return out
