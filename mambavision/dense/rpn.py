"""The region proposal network of the published detector (mmdet's RPNHead with its AnchorGenerator).

``forward`` gives the raw per-level outputs (what a training loss reads), ``anchors`` the anchors
they are relative to, and ``select_proposals`` turns outputs into per-image proposals as mmdet's
``predict_by_feat`` does (test and training time alike, with different limits); ``loss`` gives
mmdet's training losses of those outputs.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .boxes import anchor_grid, batched_nms, bbox2delta, delta2bbox
from .losses import smooth_l1_loss, weighted_mean
from .targets import assign_and_sample, inside_image, stage_parts

__all__ = ['RPN_STRIDES', 'RPNHead']

RPN_STRIDES = (4, 8, 16, 32, 64)


class RPNHead(nn.Module):
    """Region proposals: 3x3 conv + ReLU, sigmoid objectness and box deltas for 3 anchors per location.

    Anchors: scale 8 times the level's stride, ratios 0.5/1/2, centred on the grid points.
    Test: the top ``pre_nms`` per level, NMS within each level at ``iou_threshold``, the best ``max_per_img``.
    """

    def __init__(
            self, in_channels: int, channels: int, scales: Sequence[float] = (8,),
            ratios: Sequence[float] = (0.5, 1.0, 2.0), strides: Sequence[int] = RPN_STRIDES, pre_nms: int = 1000,
            max_per_img: int = 1000, iou_threshold: float = 0.7, smooth_l1_beta: float = 1 / 9,
    ):
        super().__init__()
        self.rpn_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(channels, len(scales) * len(ratios), 1)
        self.rpn_reg = nn.Conv2d(channels, len(scales) * len(ratios) * 4, 1)
        self.scales, self.ratios, self.strides = tuple(scales), tuple(ratios), tuple(strides)
        self.pre_nms, self.max_per_img, self.iou_threshold = pre_nms, max_per_img, iou_threshold
        self.smooth_l1_beta = smooth_l1_beta  # the box loss (mmdet's cascade config: SmoothL1Loss, beta 1/9)

    def base_anchors(self, stride: int) -> torch.Tensor:
        """(A, 4) anchors around the origin, in mmdet's AnchorGenerator order and float32 arithmetic."""
        h_ratios = torch.tensor(self.ratios).sqrt()
        w_ratios = 1 / h_ratios
        scales = torch.tensor(self.scales, dtype=torch.float32)
        ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def anchors(self, feature_sizes: Sequence[Sequence[int]], device: torch.device) -> List[torch.Tensor]:
        """Per level: the (H * W * A, 4) anchors of an (H, W) map, in the order of ``forward``'s flattened outputs."""
        return [anchor_grid(self.base_anchors(stride).to(device), size, stride)
                for size, stride in zip(feature_sizes, self.strides)]

    def forward(self, feats: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per level: objectness logits (B, A, H, W) and deltas (B, 4A, H, W)."""
        hidden = [F.relu(self.rpn_conv(f)) for f in feats]
        return [self.rpn_cls(h) for h in hidden], [self.rpn_reg(h) for h in hidden]

    def select_proposals(
            self, logits: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
            image_sizes: Sequence[Tuple[int, int]], pre_nms: Optional[int] = None, max_per_img: Optional[int] = None,
            iou_threshold: Optional[float] = None, min_bbox_size: float = 0,
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """mmdet's RPNHead.predict_by_feat on ``forward``'s outputs (detached): per image, proposals (N, 4)
        x1 y1 x2 y2 in input pixels, clipped to its (h, w), and their scores (N,), best first.

        ``pre_nms``, ``max_per_img`` and ``iou_threshold`` default to the test settings (training uses 2000,
        2000 and 0.7); boxes no wider or taller than ``min_bbox_size`` are dropped before NMS.
        """
        iou_threshold = self.iou_threshold if iou_threshold is None else iou_threshold
        pre_nms = self.pre_nms if pre_nms is None else pre_nms
        max_per_img = self.max_per_img if max_per_img is None else max_per_img
        anchors = self.anchors([logit.shape[-2:] for logit in logits], logits[0].device)
        proposals = []
        for b, image_size in enumerate(image_sizes):
            level_scores, level_deltas, level_anchors, level_ids = [], [], [], []
            for level, (logit, delta, anchor) in enumerate(zip(logits, deltas, anchors)):
                scores = logit[b].detach().permute(1, 2, 0).reshape(-1).float().sigmoid()
                delta = delta[b].detach().permute(1, 2, 0).reshape(-1, 4).float()
                if pre_nms < scores.shape[0]:
                    scores, order = scores.sort(descending=True)
                    scores, order = scores[:pre_nms], order[:pre_nms]
                    delta, anchor = delta[order], anchor[order]
                level_scores.append(scores)
                level_deltas.append(delta)
                level_anchors.append(anchor)
                level_ids.append(torch.full_like(scores, level, dtype=torch.long))
            boxes = delta2bbox(torch.cat(level_anchors), torch.cat(level_deltas), max_shape=image_size)
            scores, levels = torch.cat(level_scores), torch.cat(level_ids)
            valid = (boxes[:, 2] - boxes[:, 0] > min_bbox_size) & (boxes[:, 3] - boxes[:, 1] > min_bbox_size)
            if not valid.all():
                boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
            keep = batched_nms(boxes, scores, levels, iou_threshold)[:max_per_img]
            proposals.append((boxes[keep], scores[keep]))
        return proposals

    def loss(
            self, logits: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor], gt_boxes: Sequence[torch.Tensor],
            image_sizes: Sequence[Tuple[int, int]], cfg: dict, generator: Optional[torch.Generator] = None,
    ) -> Dict[str, torch.Tensor]:
        """mmdet's RPNHead.loss_by_feat on ``forward``'s outputs: ``loss_rpn_cls.{level}``, ``loss_rpn_bbox.{level}``.

        Per image, the anchors inside it (``cfg['allowed_border']``) are assigned to its ``gt_boxes`` (G, 4)
        and sampled (``cfg['assigner']``, ``cfg['sampler']``, mmdet's names); objectness is sigmoid cross
        entropy on the sampled anchors, the box loss smooth L1 on the positives' deltas; both are sums
        divided by the number of sampled anchors of the whole batch.
        """
        if cfg['sampler']['add_gt_as_proposals']:
            raise ValueError('train_cfg: rpn.sampler.add_gt_as_proposals must be False (anchors are not proposals)')
        assigner, sampler = stage_parts(cfg)
        level_anchors = self.anchors([logit.shape[-2:] for logit in logits], logits[0].device)
        anchors = torch.cat(level_anchors)
        objectness, label_weights, box_targets, box_weights = (
            anchors.new_zeros(len(image_sizes), len(anchors), *shape) for shape in ((), (), (4,), ()))
        avg_factor = 0
        for b, (boxes, image_size) in enumerate(zip(gt_boxes, image_sizes)):
            inside = inside_image(anchors, image_size, cfg['allowed_border']).nonzero().squeeze(1)
            if inside.numel() == 0:
                raise ValueError(f'image {b} of size {tuple(image_size)} has no anchor inside it; '
                                 'set train_cfg rpn.allowed_border to -1 to use anchors crossing the border')
            sampling = assign_and_sample(anchors[inside], boxes.to(anchors), assigner, sampler, generator)
            pos, neg = inside[sampling.pos_inds], inside[sampling.neg_inds]
            objectness[b, pos] = 1
            label_weights[b, pos] = cfg['pos_weight'] if cfg['pos_weight'] > 0 else 1
            label_weights[b, neg] = 1
            box_targets[b, pos] = bbox2delta(anchors[pos], boxes[sampling.pos_gt_inds].to(anchors))
            box_weights[b, pos] = 1
            avg_factor += sampling.avg_factor
        losses = {}
        start = 0
        for level, (logit, delta, anchor) in enumerate(zip(logits, deltas, level_anchors)):
            rows = slice(start, start + len(anchor))
            start += len(anchor)
            logit = logit.float().permute(0, 2, 3, 1).reshape(len(image_sizes), -1)
            delta = delta.float().permute(0, 2, 3, 1).reshape(len(image_sizes), -1, 4)
            cls = F.binary_cross_entropy_with_logits(logit, objectness[:, rows], reduction='none')
            box = smooth_l1_loss(delta, box_targets[:, rows], self.smooth_l1_beta)
            losses[f'loss_rpn_cls.{level}'] = weighted_mean(cls, label_weights[:, rows], avg_factor)
            losses[f'loss_rpn_bbox.{level}'] = weighted_mean(box, box_weights[:, rows, None], avg_factor)
        return losses

    @torch.no_grad()
    def predict(
            self, feats: Sequence[torch.Tensor], image_sizes: Sequence[Tuple[int, int]],
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Test time: per image, proposals (N, 4) in input pixels and their scores (N,), best first."""
        logits, deltas = self(feats)
        return self.select_proposals(logits, deltas, image_sizes)
