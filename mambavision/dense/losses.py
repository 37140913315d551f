"""The detector's loss functions with mmdet 3.3.0's arithmetic (weights, averaging, epsilons)."""
from typing import Dict, Optional, cast

import torch

__all__ = ['accuracy', 'giou_loss', 'smooth_l1_loss', 'total_loss', 'weighted_mean']

_AVG_EPS = torch.finfo(torch.float32).eps  # mmdet's weight_reduce_loss adds it to every avg_factor


def weighted_mean(loss: torch.Tensor, weight: Optional[torch.Tensor], avg_factor: float) -> torch.Tensor:
    """mmdet's weight_reduce_loss with an avg_factor: sum(loss * weight) / (avg_factor + eps)."""
    if weight is not None:
        loss = loss * weight
    return loss.sum() / (avg_factor + _AVG_EPS)


def smooth_l1_loss(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Element-wise smooth L1: 0.5 d^2 / beta below ``beta``, d - 0.5 beta from it (d = |pred - target|)."""
    diff = (pred - target).abs()
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def giou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """(N, 4), (N, 4) x1 y1 x2 y2 boxes -> (N,) 1 - generalised IoU (mmdet's bbox_overlaps, unions >= eps)."""
    area_pred = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_target = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    wh = (torch.min(pred[:, 2:], target[:, 2:]) - torch.max(pred[:, :2], target[:, :2])).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = (area_pred + area_target - overlap).clamp(min=eps)
    enclose_wh = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose = (enclose_wh[:, 0] * enclose_wh[:, 1]).clamp(min=eps)
    return 1 - (overlap / union - (enclose - union) / enclose)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy in percent of (N, C) logits against (N,) labels (0 when N is 0)."""
    if len(logits) == 0:
        return logits.new_tensor(0.)
    return (logits.argmax(dim=1) == labels).float().sum() * (100. / len(logits))


def total_loss(losses: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of a loss dict's entries whose name contains 'loss' (mmdet's parse_losses; accuracies left out)."""
    # a model's loss dict always holds a loss term, so sum's int start 0 is never what comes back
    return cast(torch.Tensor, sum(value for name, value in losses.items() if 'loss' in name))
