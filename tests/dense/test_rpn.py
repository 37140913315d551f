"""The detector's RPN: proposal selection and its test-time limits."""
import torch

from mambavision.dense.rpn import RPNHead


def _outputs(head: RPNHead, size: int, seed: int = 0):
    """Random objectness logits and zero deltas (proposals = anchors) for a (size, size) input, batch of 1."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [(size // stride, size // stride) for stride in head.strides]
    logits = [torch.randn(1, 3, h, w, generator=generator) for h, w in sizes]
    deltas = [torch.zeros(1, 12, h, w) for h, w in sizes]
    return logits, deltas


def test_test_time_keeps_the_best_1000_proposals():
    """At 800 x 800 five levels offer 1000 each before NMS, and far more than 1000 survive it: the cap acts."""
    head = RPNHead(8, 8)
    assert (head.pre_nms, head.max_per_img, head.iou_threshold) == (1000, 1000, 0.7)
    logits, deltas = _outputs(head, 800)
    boxes, scores = head.select_proposals(logits, deltas, [(800, 800)])[0]
    all_boxes, all_scores = head.select_proposals(logits, deltas, [(800, 800)], max_per_img=10 ** 6)[0]
    assert len(all_scores) > 1500 and len(scores) == 1000
    assert torch.equal(scores, all_scores[:1000]) and torch.equal(boxes, all_boxes[:1000])
    assert (scores[:-1] >= scores[1:]).all()


def test_pre_nms_takes_the_best_per_level():
    """With pre_nms=5 each level offers its 5 best anchors; NMS runs within a level only."""
    head = RPNHead(8, 8, pre_nms=5)
    logits, deltas = _outputs(head, 256, seed=1)
    boxes, scores = head.select_proposals(logits, deltas, [(256, 256)])[0]
    best = torch.cat([logit.sigmoid().flatten().sort(descending=True).values[:5] for logit in logits])
    assert len(scores) <= 25 and set(scores.tolist()) <= set(best.tolist())
    assert scores[0] == best.max()
    assert (boxes[:, 2] <= 256).all() and (boxes[:, 3] <= 256).all() and (boxes >= 0).all()
