"""The detector's cascade RoI heads: the final per-class selection (mmdet's multiclass_nms)."""
import torch

from mambavision.dense.roi_heads import CascadeRoIHead


def test_final_selection_keeps_scores_above_0_05_per_class():
    """Every (box, class) pair scoring above 0.05 (strictly) is a candidate; NMS acts within a class only."""
    head = CascadeRoIHead(8, 8, 16, num_classes=3)
    assert (head.score_threshold, head.iou_threshold, head.max_per_img) == (0.05, 0.5, 100)
    box = torch.tensor([10., 10., 50., 50.])
    far = torch.tensor([100., 100., 140., 140.])
    near = box + 2  # IoU 0.82 with box
    boxes = torch.stack([torch.cat([box] * 3), torch.cat([near] * 3), torch.cat([far] * 3)])  # (3 rois, 4 * 3)
    probs = torch.tensor([
        [0.60, 0.05, 0.30, 0.05],  # class 1 exactly at the threshold: dropped
        [0.50, 0.0501, 0.20, 0.0499],  # classes 0 and 2 suppressed by roi 0's boxes; class 1 just above: kept
        [0.04, 0.90, 0.06, 0.00],  # class 0 below: dropped
    ])
    kept_boxes, scores, labels = head.multiclass_nms(boxes, probs)
    expected = [(0.90, 1, far), (0.60, 0, box), (0.30, 2, box), (0.06, 2, far), (0.0501, 1, near)]
    assert torch.allclose(scores, torch.tensor([s for s, _, _ in expected]))
    assert labels.tolist() == [label for _, label, _ in expected]
    assert torch.equal(kept_boxes, torch.stack([b for _, _, b in expected]))


def test_final_selection_keeps_the_best_100():
    head = CascadeRoIHead(8, 8, 16, num_classes=2)
    xy = torch.arange(150.)[:, None] * 20
    boxes = torch.cat([xy, xy, xy + 10, xy + 10], dim=1).repeat(1, 2)  # 150 disjoint boxes, both classes
    probs = torch.softmax(torch.randn(150, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    _, scores, _ = head.multiclass_nms(boxes, probs)
    candidates = probs[:, :-1].flatten()
    assert len(scores) == 100 and torch.equal(scores, candidates[candidates > 0.05].sort(descending=True).values[:100])
