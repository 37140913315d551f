"""Box operations of the published detector, with mmdet/mmcv's arithmetic: box coding, NMS, anchors,
RoI level mapping, mask pasting. Boxes are (N, 4) x1, y1, x2, y2 in pixels."""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.ops import nms

__all__ = ['MAX_LOG_RATIO', 'MMCV_NMS_SPLIT', 'bbox2delta', 'delta2bbox', 'batched_nms', 'anchor_grid',
           'roi_levels', 'paste_mask']

MAX_LOG_RATIO = abs(math.log(16 / 1000))  # mmdet's wh_ratio_clip: box deltas change w, h by at most 62.5x
MMCV_NMS_SPLIT = 10000  # mmcv's batched_nms runs NMS group by group from this many boxes on


def bbox2delta(rois: torch.Tensor, targets: torch.Tensor, stds: Sequence[float] = (1., 1., 1., 1.)) -> torch.Tensor:
    """mmdet's DeltaXYWHBBoxCoder.encode: (N, 4) boxes and (N, 4) target boxes -> (N, 4) deltas dx, dy, dw, dh
    (centre shift in units of the box's size, log size ratio), divided by ``stds``; computed in float32."""
    rois, targets = rois.float(), targets.float()
    sizes, target_sizes = rois[:, 2:] - rois[:, :2], targets[:, 2:] - targets[:, :2]
    centers, target_centers = (rois[:, :2] + rois[:, 2:]) * 0.5, (targets[:, :2] + targets[:, 2:]) * 0.5
    deltas = torch.cat([(target_centers - centers) / sizes, torch.log(target_sizes / sizes)], dim=1)
    return deltas / deltas.new_tensor(stds)


def delta2bbox(
        rois: torch.Tensor, deltas: torch.Tensor, stds: Sequence[float] = (1., 1., 1., 1.),
        max_shape: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """mmdet's DeltaXYWHBBoxCoder.decode: (N, 4) boxes + (N, 4k) deltas -> (N, 4k) boxes, clipped to ``max_shape``
    (h, w) when given. Size changes are clamped to ``MAX_LOG_RATIO``."""
    num_rois = deltas.shape[0]
    if num_rois == 0:
        return deltas
    deltas = deltas.reshape(-1, 4) * deltas.new_tensor(stds)
    rois = rois.repeat(1, deltas.shape[0] // num_rois).reshape(-1, 4)
    centers = (rois[:, :2] + rois[:, 2:]) * 0.5
    sizes = rois[:, 2:] - rois[:, :2]
    centers = centers + sizes * deltas[:, :2]
    sizes = sizes * deltas[:, 2:].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO).exp()
    boxes = torch.cat([centers - sizes * 0.5, centers + sizes * 0.5], dim=-1)
    if max_shape is not None:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, max_shape[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, max_shape[0])
    return boxes.reshape(num_rois, -1)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """mmcv's batched_nms: NMS within each group (coordinate-offset trick); kept indices, highest score first.

    From ``MMCV_NMS_SPLIT`` boxes on, mmcv runs NMS group by group and sorts the union by score;
    the kept set is the same, so only that final order is reproduced.
    """
    if boxes.numel() == 0:
        return boxes.new_zeros(0, dtype=torch.long)
    offsets = groups.to(boxes) * (boxes.max() + 1)
    keep = nms(boxes + offsets[:, None], scores, iou_threshold)
    if boxes.shape[0] >= MMCV_NMS_SPLIT:
        keep = keep.sort().values
        keep = keep[scores[keep].sort(descending=True).indices]
    return keep


def anchor_grid(base_anchors: torch.Tensor, size: Sequence[int], stride: int) -> torch.Tensor:
    """(A, 4) anchors at the origin -> (H * W * A, 4) anchors of an (H, W) map, row-major."""
    shift_x = torch.arange(size[1], device=base_anchors.device).to(base_anchors.dtype) * stride
    shift_y = torch.arange(size[0], device=base_anchors.device).to(base_anchors.dtype) * stride
    shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing='ij')
    shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
    return (base_anchors[None] + shifts).reshape(-1, 4)


def roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: int = 56) -> torch.Tensor:
    """mmdet's SingleRoIExtractor.map_roi_levels: (K, 5) rois (image index, box) -> (K,) int64 pyramid level,
    floor(log2(sqrt(area) / finest_scale)) clamped to 0 .. num_levels - 1."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


def paste_mask(mask: torch.Tensor, box: torch.Tensor, image_size: Tuple[int, int]) -> Tuple[torch.Tensor, tuple]:
    """mmdet's _do_paste_mask for one box: a (28, 28) probability map -> its values on the pixels around the box.

    Returns the (h, w) values and the (rows, cols) slices of the image they cover.
    """
    x0_int, y0_int = (box[:2].floor() - 1).clamp(min=0).int().tolist()
    x1_int = int((box[2].ceil() + 1).clamp(max=image_size[1]))
    y1_int = int((box[3].ceil() + 1).clamp(max=image_size[0]))
    x0, y0, x1, y1 = box.split(1)
    img_y = (torch.arange(y0_int, y1_int, device=box.device).float() + 0.5 - y0) / (y1 - y0) * 2 - 1
    img_x = (torch.arange(x0_int, x1_int, device=box.device).float() + 0.5 - x0) / (x1 - x0) * 2 - 1
    img_y = img_y.masked_fill(img_y.isinf(), 0)
    img_x = img_x.masked_fill(img_x.isinf(), 0)
    grid = torch.stack([img_x[None, :].expand(len(img_y), -1), img_y[:, None].expand(-1, len(img_x))], dim=-1)
    pasted = F.grid_sample(mask[None, None].float(), grid[None], align_corners=False)[0, 0]
    return pasted, (slice(y0_int, y1_int), slice(x0_int, x1_int))
