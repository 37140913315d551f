"""The cascade RoI heads of the published detector (mmdet's CascadeRoIHead): RoI feature extraction,
three box heads refining the proposals stage by stage, three mask heads, and the final per-class selection.

Rois are (K, 5): image index in the batch, then x1, y1, x2, y2 in input pixels, grouped by image.
``box_forward`` runs one stage on given rois and ``regress_by_class`` moves rois by a stage's deltas
(what training repeats with its own rois); ``predict`` is the test path, ``loss`` mmdet's training losses.
"""
from typing import Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .boxes import batched_nms, delta2bbox, roi_levels
from .layers import ConvModule
from .losses import accuracy, giou_loss, weighted_mean
from .targets import Sampling, assign_and_sample, mask_targets, stage_parts

__all__ = ['ROI_STRIDES', 'CASCADE_STDS', 'roi_features', 'ConvFCBBoxHead', 'FCNMaskHead', 'CascadeRoIHead']

ROI_STRIDES = (4, 8, 16, 32)
CASCADE_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))


def roi_features(
        feats: Sequence[torch.Tensor], rois: torch.Tensor, output_size: int, strides: Sequence[int] = ROI_STRIDES,
) -> torch.Tensor:
    """mmdet's SingleRoIExtractor: RoIAlign each (K, 5) roi on the level its scale maps to -> (K, C, S, S).

    Levels as ``roi_levels``; RoIAlign aligned, adaptive sampling, in float32 whatever the features'
    dtype (the rois are pixel coordinates).
    """
    levels = roi_levels(rois, len(strides))
    out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], output_size, output_size)
    for level, stride in enumerate(strides):
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


def rois_per_image(rois: torch.Tensor, num_images: int) -> List[slice]:
    """The rows of each image's rois in (K, 5) rois grouped by image, in order."""
    counts = torch.bincount(rois[:, 0].long(), minlength=num_images).tolist()
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [slice(s, s + n) for s, n in zip(starts, counts)]


class CascadeRoIHead(nn.Module):
    """Three box heads refining the proposals stage by stage, and three mask heads averaged after the sigmoid.

    Test: class logits averaged over the stages, softmax, the last stage's class-wise boxes, scores
    above ``score_threshold``, NMS per class at ``iou_threshold``, the best ``max_per_img``; mask
    probabilities (28 x 28) of each detection's class.
    """

    def __init__(
            self, in_channels: int, channels: int, fc_channels: int, num_classes: int = 80,
            stage_stds: Sequence[Sequence[float]] = CASCADE_STDS, score_threshold: float = 0.05,
            iou_threshold: float = 0.5, max_per_img: int = 100,
            stage_loss_weights: Sequence[float] = (1., 0.5, 0.25), bbox_loss_weight: float = 10.,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.bbox_head = nn.ModuleList([
            ConvFCBBoxHead(in_channels, channels, fc_channels, num_classes) for _ in stage_stds])
        self.mask_head = nn.ModuleList([FCNMaskHead(in_channels, channels, num_classes) for _ in stage_stds])
        self.stage_stds = tuple(tuple(s) for s in stage_stds)
        self.score_threshold, self.iou_threshold, self.max_per_img = score_threshold, iou_threshold, max_per_img
        self.stage_loss_weights, self.bbox_loss_weight = tuple(stage_loss_weights), bbox_loss_weight

    def box_forward(
            self, stage: int, feats: Sequence[torch.Tensor], rois: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stage ``stage``'s box head on (K, 5) rois: class logits (K, C+1) and class-wise deltas (K, 4C), float32."""
        logits, deltas = self.bbox_head[stage](roi_features(feats, rois, 7))
        return logits.float(), deltas.float()

    def regress_by_class(
            self, stage: int, rois: torch.Tensor, labels: torch.Tensor, deltas: torch.Tensor,
            image_sizes: Sequence[Tuple[int, int]],
    ) -> torch.Tensor:
        """mmdet's regress_by_class: (K, 5) rois moved by stage ``stage``'s deltas (K, 4C) of class ``labels`` (K,),
        clipped to each image's (h, w) -> (K, 5) rois."""
        deltas = deltas.gather(1, labels[:, None] * 4 + torch.arange(4, device=labels.device))
        boxes = [delta2bbox(rois[rows, 1:], deltas[rows], self.stage_stds[stage], size)
                 for rows, size in zip(rois_per_image(rois, len(image_sizes)), image_sizes)]
        return torch.cat([rois[:, :1], torch.cat(boxes)], dim=1)

    def refine_boxes(
            self, feats: Sequence[torch.Tensor], rois: torch.Tensor, image_sizes: Sequence[Tuple[int, int]],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Test time: (K, 5) rois -> the last stage's rois (K, 5), stage-averaged logits (K, C+1), its deltas (K, 4C).

        Between stages each roi moves by the deltas of its best class (background left out).
        """
        stage_logits = []
        for stage in range(len(self.bbox_head)):
            logits, deltas = self.box_forward(stage, feats, rois)
            stage_logits.append(logits)
            if stage < len(self.bbox_head) - 1:
                rois = self.regress_by_class(stage, rois, logits[:, :-1].argmax(dim=1), deltas, image_sizes)
        mean_logits = cast(torch.Tensor, sum(stage_logits)) / float(len(stage_logits))  # one term per stage, >= 1
        return rois, mean_logits, deltas

    def loss(
            self, feats: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor], targets: Sequence[dict],
            image_sizes: Sequence[Tuple[int, int]], cfg: Sequence[dict], generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """mmdet's CascadeRoIHead.loss: per stage ``s{i}.loss_cls``, ``s{i}.acc`` (percent), ``s{i}.loss_bbox``
        and, when the targets have ``masks``, ``s{i}.loss_mask``; the losses times the stage's weight.

        Args:
            feats: the FPN maps (the first four are used).
            proposals: per image (N, 4) boxes in input pixels (not differentiated).
            targets: per image ``boxes`` (G, 4), ``labels`` (G,) and optionally ``masks`` (G, h, w).
            image_sizes: each image's (h, w) inside the padding.
            cfg: per stage ``assigner``, ``sampler``, ``mask_size``, ``pos_weight`` (``train_cfg['rcnn']``).
            generator: the samplers' random draws.

        Each stage assigns and samples its boxes (the ground truth added as proposals), then moves them by
        its deltas for the next stage (positives by their target class, the rest by their best class),
        leaving the added ground truth out.
        """
        if len(cfg) != len(self.bbox_head):
            raise ValueError(f'train_cfg: rcnn needs {len(self.bbox_head)} stages, got {len(cfg)}')
        feats = feats[:len(ROI_STRIDES)]
        boxes = [p.detach().float() for p in proposals]
        gt_boxes = [t['boxes'].to(boxes[0]) for t in targets]
        losses = {}
        for stage, (stage_cfg, weight) in enumerate(zip(cfg, self.stage_loss_weights)):
            assigner, sampler = stage_parts(stage_cfg)
            samplings = [assign_and_sample(b, gt, assigner, sampler, generator) for b, gt in zip(boxes, gt_boxes)]
            rois = torch.cat([F.pad(s.sampled(), (1, 0), value=float(i)) for i, s in enumerate(samplings)])
            labels = torch.cat([
                torch.cat([t['labels'][s.pos_gt_inds], t['labels'].new_full((len(s.neg_inds),), self.num_classes)])
                for s, t in zip(samplings, targets)]).to(rois.device)
            pos_boxes = torch.cat([gt[s.pos_gt_inds] for s, gt in zip(samplings, gt_boxes)])
            logits, deltas = self.box_forward(stage, feats, rois)
            stage_losses = self.box_loss(stage, rois, logits, deltas, labels, pos_boxes, stage_cfg['pos_weight'])
            if 'masks' in targets[0]:
                stage_losses['loss_mask'] = self.mask_loss(stage, feats, samplings, targets, stage_cfg['mask_size'])
            losses.update({f's{stage}.{name}': value * weight if 'loss' in name else value
                           for name, value in stage_losses.items()})
            if stage < len(self.bbox_head) - 1:
                boxes = self.next_stage_boxes(stage, rois, logits, deltas, labels, samplings, image_sizes)
        return losses

    def box_loss(
            self, stage: int, rois: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor,
            pos_boxes: torch.Tensor, pos_weight: float = -1,
    ) -> Dict[str, torch.Tensor]:
        """mmdet's BBoxHead.loss with reg_decoded_bbox: softmax cross entropy over the (K,) sampled rois
        (background = ``num_classes``), their accuracy, and GIoU of the positives' decoded boxes of their
        class against ``pos_boxes`` (P, 4), summed over the positives and divided by K."""
        positive = labels < self.num_classes
        weights = torch.ones_like(logits[:, 0])
        if pos_weight > 0:
            weights[positive] = pos_weight
        cls = F.cross_entropy(logits, labels, reduction='none')
        losses = dict(loss_cls=weighted_mean(cls, weights, max(float((weights > 0).sum()), 1.)),
                      acc=accuracy(logits, labels))
        if positive.any():
            pos_deltas = deltas.reshape(len(deltas), -1, 4)[positive, labels[positive]]
            decoded = delta2bbox(rois[positive, 1:], pos_deltas, self.stage_stds[stage])
            giou = weighted_mean(giou_loss(decoded, pos_boxes), None, len(labels))
            losses['loss_bbox'] = self.bbox_loss_weight * giou
        else:
            losses['loss_bbox'] = deltas[positive].sum()
        return losses

    def mask_loss(
            self, stage: int, feats: Sequence[torch.Tensor], samplings: Sequence[Sampling], targets: Sequence[dict],
            mask_size: int = 28,
    ) -> torch.Tensor:
        """mmdet's FCNMaskHead.loss: binary cross entropy of each positive's mask logits of its class against
        its ground-truth mask resampled to the box (``mask_targets``), averaged over all pixels."""
        pos_boxes = [s.candidates[s.pos_inds] for s in samplings]
        rois = torch.cat([F.pad(b, (1, 0), value=float(i)) for i, b in enumerate(pos_boxes)])
        logits = self.mask_head[stage](roi_features(feats, rois, 14)).float()
        if len(rois) == 0:
            return logits.sum()
        labels = torch.cat([t['labels'][s.pos_gt_inds] for s, t in zip(samplings, targets)]).to(rois.device)
        expected = torch.cat([mask_targets(t['masks'].to(rois.device), b, s.pos_gt_inds, mask_size)
                              for b, s, t in zip(pos_boxes, samplings, targets)])
        return F.binary_cross_entropy_with_logits(logits[torch.arange(len(labels), device=rois.device), labels],
                                                  expected)

    @torch.no_grad()
    def next_stage_boxes(
            self, stage: int, rois: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor,
            samplings: Sequence[Sampling], image_sizes: Sequence[Tuple[int, int]],
    ) -> List[torch.Tensor]:
        """mmdet's BBoxHead.refine_bboxes: per image, the sampled rois moved by this stage's deltas (target
        class for positives, best non-background class otherwise), clipped, the added ground truth left out."""
        labels = torch.where(labels == self.num_classes, logits[:, :-1].argmax(dim=1), labels)
        moved = self.regress_by_class(stage, rois, labels, deltas, image_sizes)
        keep = torch.cat([torch.cat([~s.pos_is_gt, torch.ones_like(s.neg_inds, dtype=torch.bool)]) for s in samplings])
        counts = [len(s.pos_inds) + len(s.neg_inds) - int(s.pos_is_gt.sum()) for s in samplings]
        return list(moved[keep, 1:].split(counts))

    def multiclass_nms(
            self, boxes: torch.Tensor, scores: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mmdet's multiclass_nms: (K, 4C) boxes, (K, C+1) probabilities -> boxes (N, 4), scores, labels.

        Every (box, class) pair scoring above ``score_threshold``, NMS within each class, the best ``max_per_img``.
        """
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
            image_sizes: Sequence[Tuple[int, int]],
    ) -> List[Dict[str, torch.Tensor]]:
        """Per image: ``boxes`` (N, 4) in input pixels, ``scores`` (N,), ``labels`` (N,) int64, highest score
        first, and ``mask_probs`` (N, 28, 28), the mask of each box's class in the box's frame."""
        rois = torch.cat([F.pad(p.float(), (1, 0), value=float(i)) for i, p in enumerate(proposals)])
        if rois.shape[0]:
            rois, logits, deltas = self.refine_boxes(feats, rois, image_sizes)
            detections = [
                self.multiclass_nms(delta2bbox(rois[rows, 1:], deltas[rows], self.stage_stds[-1], size),
                                    logits[rows].softmax(dim=-1))
                for rows, size in zip(rois_per_image(rois, len(image_sizes)), image_sizes)]
        else:
            empty = rois.new_zeros(0)
            detections = [(empty.reshape(0, 4), empty, empty.long())] * len(image_sizes)
        mask_rois = torch.cat([F.pad(boxes, (1, 0), value=float(i)) for i, (boxes, _, _) in enumerate(detections)])
        labels = torch.cat([labels for _, _, labels in detections])
        probs = self.mask_probs(feats, mask_rois, labels) if labels.numel() else mask_rois.new_zeros(0, 28, 28)
        counts = [len(labels) for _, _, labels in detections]
        return [dict(boxes=boxes, scores=scores, labels=labels, mask_probs=image_probs)
                for (boxes, scores, labels), image_probs in zip(detections, probs.split(counts))]
