"""Cascade Mask R-CNN with a MambaVision backbone: NVIDIA's published COCO detectors on torchvision ops.

The test path of MMDetection 3.3.0's ``CascadeRCNN`` as published (FPN, RPN, three cascade box
heads, three FCN mask heads), written on ``torchvision.ops.nms`` and ``roi_align`` and reproducing
mmdet's arithmetic step by step. Submodules carry mmdet's names, so a published ``state_dict``
loads with a plain strict ``load_state_dict``. Inference only: training stays with the detection
frameworks.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, roi_align

from ..model import create_dense_backbone
from ..weights import load_state_dict_strict
from . import published_file, read_published_file, unknown_name_error
from .classes import COCO_CLASSES, COCO_PALETTE
from .image import as_rgb_images, normalize, resize_keep_ratio

__all__ = ['CascadeMaskRCNN', 'create_detector', 'list_detectors']

MAX_LOG_RATIO = abs(math.log(16 / 1000))  # mmdet's wh_ratio_clip: box deltas change w, h by at most 62.5x
MMCV_NMS_SPLIT = 10000  # mmcv's batched_nms runs NMS group by group from this many boxes on
RPN_STRIDES = (4, 8, 16, 32, 64)
ROI_STRIDES = (4, 8, 16, 32)
CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


class ConvModule(nn.Module):
    """mmcv's ConvModule as the published heads use it: conv (bias unless normed) -> [BatchNorm] -> [ReLU]."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, norm: bool = False, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(out_chs) if norm else nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class FPN(nn.Module):
    """Feature pyramid: 4 maps (strides 4-32) -> ``num_outs`` maps of ``channels`` (the 5th a stride-2 max-pool)."""

    def __init__(self, in_channels: Sequence[int], channels: int = 256, num_outs: int = 5):
        super().__init__()
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1, act=False) for c in in_channels])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3, act=False) for _ in in_channels])
        self.num_outs = num_outs

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


def delta2bbox(
        rois: torch.Tensor, deltas: torch.Tensor, stds: Sequence[float], max_shape: Tuple[int, int],
) -> torch.Tensor:
    """mmdet's DeltaXYWHBBoxCoder.decode: (N, 4) boxes + (N, 4k) deltas -> (N, 4k) boxes clipped to (h, w)."""
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


def anchor_grid(base_anchors: torch.Tensor, size: Tuple[int, int], stride: int) -> torch.Tensor:
    """(A, 4) anchors at the origin -> (H * W * A, 4) anchors of an (H, W) map, row-major."""
    shift_x = torch.arange(size[1], device=base_anchors.device).to(base_anchors.dtype) * stride
    shift_y = torch.arange(size[0], device=base_anchors.device).to(base_anchors.dtype) * stride
    shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing='ij')
    shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
    return (base_anchors[None] + shifts).reshape(-1, 4)


class RPNHead(nn.Module):
    """Region proposals: 3x3 conv + ReLU, sigmoid objectness and box deltas for 3 anchors per location.

    Anchors: scale 8 times the level's stride, ratios 0.5/1/2, centred on the grid points.
    Test: the top ``pre_nms`` per level, NMS within each level, the best ``max_per_img``.
    """

    def __init__(
            self, in_channels: int, channels: int, scales: Sequence[float] = (8,),
            ratios: Sequence[float] = (0.5, 1.0, 2.0), pre_nms: int = 1000, max_per_img: int = 1000,
            iou_threshold: float = 0.7,
    ):
        super().__init__()
        self.rpn_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, len(scales) * len(ratios), 1)
        self.rpn_reg = nn.Conv2d(channels, len(scales) * len(ratios) * 4, 1)
        self.scales, self.ratios = tuple(scales), tuple(ratios)
        self.pre_nms, self.max_per_img, self.iou_threshold = pre_nms, max_per_img, iou_threshold

    def base_anchors(self, stride: int) -> torch.Tensor:
        """(A, 4) anchors around the origin, in mmdet's AnchorGenerator order and float32 arithmetic."""
        h_ratios = torch.tensor(self.ratios).sqrt()
        w_ratios = 1 / h_ratios
        scales = torch.tensor(self.scales, dtype=torch.float32)
        ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def forward(self, feats: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per level: objectness logits (B, A, H, W) and deltas (B, 4A, H, W)."""
        hidden = [F.relu(self.rpn_conv(f)) for f in feats]
        return [self.rpn_cls(h) for h in hidden], [self.rpn_reg(h) for h in hidden]

    @torch.no_grad()
    def predict(
            self, feats: Sequence[torch.Tensor], image_sizes: Sequence[Tuple[int, int]],
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per image: proposals (N, 4) x1 y1 x2 y2 in input pixels and their scores (N,), best first."""
        logits, deltas = self(feats)
        anchors = [
            anchor_grid(self.base_anchors(stride).to(l.device), l.shape[-2:], stride)
            for l, stride in zip(logits, RPN_STRIDES)]
        proposals = []
        for b, image_size in enumerate(image_sizes):
            level_scores, level_deltas, level_anchors, level_ids = [], [], [], []
            for level, (logit, delta, anchor) in enumerate(zip(logits, deltas, anchors)):
                scores = logit[b].permute(1, 2, 0).reshape(-1).float().sigmoid()
                delta = delta[b].permute(1, 2, 0).reshape(-1, 4).float()
                if self.pre_nms < scores.shape[0]:
                    scores, order = scores.sort(descending=True)
                    scores, order = scores[:self.pre_nms], order[:self.pre_nms]
                    delta, anchor = delta[order], anchor[order]
                level_scores.append(scores)
                level_deltas.append(delta)
                level_anchors.append(anchor)
                level_ids.append(torch.full_like(scores, level, dtype=torch.long))
            boxes = delta2bbox(torch.cat(level_anchors), torch.cat(level_deltas), (1., 1., 1., 1.), image_size)
            scores, level_ids = torch.cat(level_scores), torch.cat(level_ids)
            valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            if not valid.all():
                boxes, scores, level_ids = boxes[valid], scores[valid], level_ids[valid]
            keep = batched_nms(boxes, scores, level_ids, self.iou_threshold)[:self.max_per_img]
            proposals.append((boxes[keep], scores[keep]))
        return proposals


def roi_features(feats: Sequence[torch.Tensor], rois: torch.Tensor, output_size: int) -> torch.Tensor:
    """mmdet's SingleRoIExtractor: RoIAlign each (K, 5) roi on the level its scale maps to -> (K, C, S, S).

    Level floor(log2(sqrt(area) / 56)), clamped to 0..3; RoIAlign aligned, adaptive sampling, in
    float32 whatever the features' dtype (the rois are pixel coordinates).
    """
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, len(ROI_STRIDES) - 1).long()
    out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], output_size, output_size)
    for level, stride in enumerate(ROI_STRIDES):
        inds = (levels == level).nonzero().squeeze(1)
        if inds.numel():
            out[inds] = roi_align(
                feats[level].float(), rois[inds], output_size, spatial_scale=1 / stride, sampling_ratio=0,
                aligned=True).to(out.dtype)
    return out


class ConvFCBBoxHead(nn.Module):
    """Cascade box head: 4 conv-BN-ReLU, 1 fc + ReLU, then class logits (K, C+1) and class-wise deltas (K, 4C)."""

    def __init__(
            self, in_channels: int, channels: int, fc_channels: int, num_classes: int = 80,
            num_convs: int = 4, roi_size: int = 7,
    ):
        super().__init__()
        self.shared_convs = nn.ModuleList([
            ConvModule(in_channels if i == 0 else channels, channels, 3, norm=True) for i in range(num_convs)])
        self.shared_fcs = nn.ModuleList([nn.Linear(channels * roi_size ** 2, fc_channels)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 * num_classes)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """Mask head: 4 conv-ReLU, a stride-2 deconv + ReLU, 1x1 logits: (K, C, 14, 14) -> (K, classes, 28, 28)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int = 80, num_convs: int = 4):
        super().__init__()
        self.convs = nn.ModuleList([
            ConvModule(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs)])
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(F.relu(self.upsample(x)))


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


class CascadeRoIHead(nn.Module):
    """Three box heads refining the proposals stage by stage, and three mask heads averaged after the sigmoid.

    Test: class logits averaged over the stages, softmax, the last stage's class-wise boxes, score
    threshold, NMS per class, the best ``max_per_img``; masks pasted into the image at ``mask_threshold``.
    """

    def __init__(
            self, in_channels: int, channels: int, fc_channels: int, num_classes: int = 80,
            stage_stds: Sequence[Sequence[float]] = CASCADE_STDS, score_threshold: float = 0.05,
            iou_threshold: float = 0.5, max_per_img: int = 100, mask_threshold: float = 0.5,
    ):
        super().__init__()
        self.bbox_head = nn.ModuleList([
            ConvFCBBoxHead(in_channels, channels, fc_channels, num_classes) for _ in stage_stds])
        self.mask_head = nn.ModuleList([FCNMaskHead(in_channels, channels, num_classes) for _ in stage_stds])
        self.stage_stds = tuple(tuple(s) for s in stage_stds)
        self.score_threshold, self.iou_threshold = score_threshold, iou_threshold
        self.max_per_img, self.mask_threshold = max_per_img, mask_threshold

    def refine_boxes(
            self, feats: Sequence[torch.Tensor], rois: torch.Tensor, image_sizes: Sequence[Tuple[int, int]],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, 5) rois -> the last stage's rois (K, 5), stage-averaged logits (K, C+1), its deltas (K, 4C)."""
        stage_logits = []
        for stage, head in enumerate(self.bbox_head):
            logits, deltas = (t.float() for t in head(roi_features(feats, rois, 7)))
            stage_logits.append(logits)
            if stage == len(self.bbox_head) - 1:
                break
            labels = logits[:, :-1].argmax(dim=1)
            deltas = deltas.gather(1, labels[:, None] * 4 + torch.arange(4, device=labels.device))
            refined = [
                delta2bbox(rois[idx, 1:], deltas[idx], self.stage_stds[stage], size)
                for idx, size in self._per_image(rois, image_sizes)]
            rois = torch.cat([rois[:, :1], torch.cat(refined)], dim=1)
        return rois, sum(stage_logits) / float(len(stage_logits)), deltas

    @staticmethod
    def _per_image(rois: torch.Tensor, image_sizes: Sequence[Tuple[int, int]]):
        """(roi indices, image size) of each image; rois are grouped by image, in order."""
        counts = torch.bincount(rois[:, 0].long(), minlength=len(image_sizes)).tolist()
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [(slice(s, s + n), size) for s, n, size in zip(starts, counts, image_sizes)]

    def multiclass_nms(
            self, boxes: torch.Tensor, scores: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mmdet's multiclass_nms: (K, 4C) boxes, (K, C+1) probabilities -> boxes (N, 4), scores, labels."""
        num_classes = scores.shape[1] - 1
        boxes = boxes.reshape(-1, 4)
        scores = scores[:, :-1].reshape(-1)
        labels = torch.arange(num_classes, device=scores.device).repeat(scores.shape[0] // num_classes)
        inds = (scores > self.score_threshold).nonzero().squeeze(1)
        boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
        keep = batched_nms(boxes, scores, labels, self.iou_threshold)[:self.max_per_img]
        return boxes[keep], scores[keep], labels[keep]

    def mask_probs(self, feats: Sequence[torch.Tensor], rois: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(K, 5) rois and their labels -> (K, 28, 28) mask probabilities, averaged over the stages."""
        mask_feats = roi_features(feats, rois, 14)
        probs = torch.stack([head(mask_feats).float().sigmoid() for head in self.mask_head]).mean(dim=0)
        return probs[torch.arange(len(labels), device=labels.device), labels]

    @torch.no_grad()
    def predict(
            self, feats: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor],
            image_sizes: Sequence[Tuple[int, int]], original_sizes: Sequence[Tuple[int, int]],
            scale_factors: Sequence[Tuple[float, float]],
    ) -> List[Dict[str, torch.Tensor]]:
        """Per image: detections in original-image pixels (boxes = input boxes / scale factor)."""
        feats = feats[:len(ROI_STRIDES)]
        rois = torch.cat([F.pad(p.float(), (1, 0), value=float(i)) for i, p in enumerate(proposals)])
        detections = []
        if rois.shape[0]:
            rois, logits, deltas = self.refine_boxes(feats, rois, image_sizes)
            for idx, size in self._per_image(rois, image_sizes):
                boxes = delta2bbox(rois[idx, 1:], deltas[idx], self.stage_stds[-1], size)
                detections.append(self.multiclass_nms(boxes, logits[idx].softmax(dim=-1)))
        else:
            empty = rois.new_zeros(0)
            detections = [(empty.reshape(0, 4), empty, empty.long())] * len(image_sizes)
        mask_rois = torch.cat([F.pad(boxes, (1, 0), value=float(i)) for i, (boxes, _, _) in enumerate(detections)])
        labels = torch.cat([labels for _, _, labels in detections])
        probs = self.mask_probs(feats, mask_rois, labels) if labels.numel() else None
        results, start = [], 0
        for (boxes, scores, labels), original_size, (sx, sy) in zip(detections, original_sizes, scale_factors):
            boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
            masks = torch.zeros(len(boxes), *original_size, dtype=torch.bool, device=boxes.device)
            for i, box in enumerate(boxes):
                pasted, region = paste_mask(probs[start + i], box, original_size)
                masks[(i, *region)] = pasted >= self.mask_threshold
            start += len(boxes)
            results.append(dict(boxes=boxes, scores=scores, labels=labels, masks=masks))
        return results


class CascadeMaskRCNN(nn.Module):
    """Cascade Mask R-CNN with a MambaVision backbone, as NVIDIA published it for COCO.

    ``predict(images)`` runs the published test protocol; ``forward(x, image_sizes, ...)`` runs the
    network and post-processing on a normalised, zero-padded batch.

    Args:
        arch: the backbone: a dense backbone tag ('mambavision_t.nv_coco': its architecture and the
            published windows) or a registered MambaVision architecture.
        window_size: the backbone's window per stage (default: the tag's).
        channels: width of the FPN, the RPN and the RoI heads' convs.
        fc_channels: width of the box heads' fc layer.
        num_classes: object classes (background comes on top).
        test_scale: the keep-ratio resize of the test protocol, (long side, short side).
        backbone_kwargs: overrides of the backbone architecture (e.g. ``dim``, ``depths``).
    """

    def __init__(
            self,
            arch: str = 'mambavision_t.nv_coco',
            window_size: Optional[Sequence[int]] = None,
            channels: int = 256,
            fc_channels: int = 1024,
            num_classes: int = 80,
            test_scale: Tuple[int, int] = (1333, 800),
            backbone_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        self.backbone = create_dense_backbone(arch, window_size, **(backbone_kwargs or {}))
        self.neck = FPN([info['num_chs'] for info in self.backbone.feature_info], channels)
        self.rpn_head = RPNHead(channels, channels)
        self.roi_head = CascadeRoIHead(channels, channels, fc_channels, num_classes)
        self.test_scale = tuple(test_scale)
        self.size_divisor = 32
        coco = num_classes == len(COCO_CLASSES)
        self.class_names = list(COCO_CLASSES) if coco else [f'class {i}' for i in range(num_classes)]
        self.palette = [list(c) for c in COCO_PALETTE] if coco else torch.randint(
            0, 256, (num_classes, 3), generator=torch.Generator().manual_seed(0), device='cpu').tolist()
        self.published: Optional[dict] = None

    def extract_feat(self, x: torch.Tensor) -> List[torch.Tensor]:
        """(B, 3, H, W) normalised images -> 5 FPN maps (B, channels, H / s, W / s), s = 4 ... 64."""
        return self.neck(self.backbone.forward_intermediates(x, intermediates_only=True))

    def forward(
            self,
            x: torch.Tensor,
            image_sizes: Sequence[Tuple[int, int]],
            original_sizes: Optional[Sequence[Tuple[int, int]]] = None,
            scale_factors: Optional[Sequence[Tuple[float, float]]] = None,
    ) -> List[Dict[str, torch.Tensor]]:
        """Detections of a normalised batch zero-padded on the right and bottom.

        Args:
            x: (B, 3, H, W) images, H and W multiples of 32.
            image_sizes: each image's (h, w) inside the padding.
            original_sizes: each image's (h, w) before the resize (default: ``image_sizes``).
            scale_factors: each image's resize factors (w, h) (default: 1).

        Returns:
            Per image: boxes (N, 4) x1 y1 x2 y2 in original pixels, scores (N,), labels (N,) int64,
            masks (N, h, w) bool at the original size; highest score first.
        """
        if len(image_sizes) != len(x):
            raise ValueError(f'image_sizes needs one (h, w) per image: got {len(image_sizes)} for a batch of {len(x)}')
        feats = self.extract_feat(x)
        proposals = [boxes for boxes, _ in self.rpn_head.predict(feats, image_sizes)]
        return self.roi_head.predict(
            feats, proposals, image_sizes, original_sizes or image_sizes, scale_factors or [(1., 1.)] * len(x))

    def preprocess(self, image) -> Tuple[torch.Tensor, Tuple[float, float]]:
        """(H, W, 3) uint8 RGB -> normalised (3, h, w) float32 at the test scale and its (w, h) scale factors."""
        resized, scale_factor = resize_keep_ratio(image, self.test_scale)
        return normalize(resized), scale_factor

    def padded_size(self, image: torch.Tensor) -> Tuple[int, int]:
        """(3, h, w) -> (h, w) rounded up to multiples of ``size_divisor`` (32)."""
        d = self.size_divisor
        return math.ceil(image.shape[1] / d) * d, math.ceil(image.shape[2] / d) * d

    def pad_batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(3, h, w) images -> (B, 3, H, W), zero-padded right and bottom to the largest padded size."""
        height, width = (max(sizes) for sizes in zip(*(self.padded_size(im) for im in images)))
        return torch.stack([F.pad(im, (0, width - im.shape[2], 0, height - im.shape[1])) for im in images])

    @torch.no_grad()
    def predict(self, images, batch_size: int = 1) -> List[Dict[str, torch.Tensor]]:
        """Detect objects in one image or a list (PIL, (H, W, 3) uint8 RGB array or tensor, or path).

        The published test protocol: keep-ratio resize to ``test_scale``, normalise, zero-pad to a
        multiple of 32. Up to ``batch_size`` images that pad to the same size run in one forward
        (the backbone's windows see the padding, so only same-size images batch exactly).

        Returns:
            Per image: boxes (N, 4) float32 x1 y1 x2 y2 in image pixels, scores (N,), labels (N,)
            int64 in 0..num_classes-1, masks (N, H, W) bool; highest score first.
        """
        if batch_size < 1:
            raise ValueError(f'batch_size must be at least 1, got {batch_size}')
        images = as_rgb_images(images)
        param = next(self.parameters())
        inputs = [self.preprocess(im) for im in images]
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, (x, _) in enumerate(inputs):
            groups.setdefault(self.padded_size(x), []).append(i)
        results: List[Optional[dict]] = [None] * len(images)
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                batch = self.pad_batch([inputs[i][0] for i in chunk]).to(param.device, param.dtype)
                outputs = self(
                    batch, [tuple(inputs[i][0].shape[1:]) for i in chunk],
                    [images[i].shape[:2] for i in chunk], [inputs[i][1] for i in chunk])
                for i, out in zip(chunk, outputs):
                    results[i] = {k: v.cpu() for k, v in out.items()}
        return results


# name -> (the dense backbone tag: architecture, windows and published file; box AP, mask AP)
_PUBLISHED = {
    'cascade_mask_rcnn_mambavision_t.nv_coco': ('mambavision_t.nv_coco', 51.1, 44.3),
    'cascade_mask_rcnn_mambavision_s.nv_coco': ('mambavision_s.nv_coco', 52.3, 45.2),
    'cascade_mask_rcnn_mambavision_b.nv_coco': ('mambavision_b.nv_coco', 52.8, 45.7),
}


def list_detectors() -> List[str]:
    """Names ``create_detector`` accepts."""
    return list(_PUBLISHED)


def create_detector(
        name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs,
) -> CascadeMaskRCNN:
    """A published Cascade Mask R-CNN (see ``list_detectors()``), in eval mode.

    Args:
        name: e.g. 'cascade_mask_rcnn_mambavision_t.nv_coco'.
        pretrained: download the published weights (Hugging Face; cached).
        checkpoint_path: a local published ``.pth`` (mmengine checkpoint) or a saved ``state_dict`` of ours.
        kwargs: ``CascadeMaskRCNN`` arguments (e.g. ``test_scale``).
    """
    if name not in _PUBLISHED:
        raise unknown_name_error('detector', name, list(_PUBLISHED))
    backbone, box_ap, mask_ap = _PUBLISHED[name]
    model = CascadeMaskRCNN(backbone, **kwargs)
    repo, filename = published_file(backbone)
    model.published = dict(hf_repo=repo, file=filename, box_ap=box_ap, mask_ap=mask_ap)
    if checkpoint_path is not None or pretrained:
        state_dict = read_published_file(backbone, checkpoint_path, 'Cascade Mask R-CNN', 'roi_head', model)
        load_state_dict_strict(model, state_dict, str(checkpoint_path or filename))
    return model.eval()
