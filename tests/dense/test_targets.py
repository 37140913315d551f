"""Detector training targets: assigner, sampler, mask targets and settings against hand-computed expectations."""
import pytest
import torch

from mambavision.dense.targets import (
    DEFAULT_TRAIN_CFG, MaxIoUAssigner, RandomSampler, assign_and_sample, batch_targets, box_iou, inside_image,
    mask_targets, train_config)


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_box_iou_is_intersection_over_union():
    iou = box_iou(boxes([0, 0, 10, 10], [0, 0, 4, 4]), boxes([5, 5, 15, 15], [20, 20, 30, 30], [0, 0, 10, 10]))
    expected = torch.tensor([[25 / 175, 0, 1], [0, 0, 16 / 100]])
    torch.testing.assert_close(iou, expected)
    assert box_iou(boxes([3, 3, 3, 3]), boxes([3, 3, 3, 3])).item() == 0  # the union floor, no 0 / 0


def test_assigner_thresholds():
    """Negative below neg_iou_thr, ignored in between, the best ground truth from pos_iou_thr on."""
    gt = boxes([0, 0, 10, 10], [20, 0, 30, 10])
    candidates = boxes(
        [0, 0, 10, 10],    # iou 1 with gt 0
        [0, 0, 10, 6],     # 0.6: between the thresholds, ignored
        [0, 0, 10, 2],     # 0.2: negative
        [20, 0, 30, 9],    # 0.9 with gt 1
        [50, 50, 60, 60],  # 0: negative
    )
    assigner = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, match_low_quality=False)
    assert assigner(candidates, gt).tolist() == [1, -1, 0, 2, 0]


def test_assigner_low_quality_matches():
    """Each ground-truth box takes its best candidates (all ties) when they reach min_pos_iou."""
    gt = boxes([0, 0, 10, 10], [100, 100, 110, 110])
    candidates = boxes([0, 0, 10, 5], [0, 5, 10, 10], [0, 0, 10, 3], [100, 100, 110, 102])  # ious .5 .5 .3 | .2
    strict = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.1, min_pos_iou=0.3, match_low_quality=False)
    assert strict(candidates, gt).tolist() == [-1, -1, -1, -1]
    low = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.1, min_pos_iou=0.3)
    assert low(candidates, gt).tolist() == [1, 1, -1, -1]  # both ties; gt 1's best (0.2) is below min_pos_iou
    first_only = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.1, min_pos_iou=0.3, gt_max_assign_all=False)
    assert first_only(candidates, gt).tolist() == [1, -1, -1, -1]


def test_assigner_later_ground_truth_wins_a_shared_best_candidate():
    gt = boxes([0, 0, 10, 10], [0, 0, 10, 10.5])
    candidates = boxes([0, 0, 10, 10.2], [50, 50, 60, 60])
    assigner = MaxIoUAssigner(pos_iou_thr=0.99, neg_iou_thr=0.3, min_pos_iou=0.3)
    assert assigner(candidates, gt).tolist() == [2, 0]
    assigner.gt_max_assign_all = False
    assert assigner(candidates, gt).tolist() == [2, 0]


def loop_assign(assigner: MaxIoUAssigner, candidates, gt):
    """mmdet's assign_wrt_overlaps as written: thresholds, then each ground-truth box in turn."""
    overlaps = box_iou(gt, candidates)
    max_overlaps, argmax = overlaps.max(dim=0)
    gt_inds = torch.full((len(candidates),), -1)
    gt_inds[max_overlaps < assigner.neg_iou_thr] = 0
    gt_inds[max_overlaps >= assigner.pos_iou_thr] = argmax[max_overlaps >= assigner.pos_iou_thr] + 1
    for i in range(len(gt)):
        if overlaps[i].max() >= assigner.min_pos_iou:
            if assigner.gt_max_assign_all:
                gt_inds[overlaps[i] == overlaps[i].max()] = i + 1
            else:
                gt_inds[overlaps[i].argmax()] = i + 1
    return gt_inds


@pytest.mark.parametrize('assign_all', [True, False])
def test_assigner_equals_the_loop_it_vectorises(assign_all):
    gen = torch.Generator().manual_seed(0)
    xy = torch.randint(0, 20, (300, 2), generator=gen).float()
    candidates = torch.cat([xy, xy + torch.randint(1, 12, (300, 2), generator=gen)], 1)
    gt = candidates[torch.randint(0, 300, (12,), generator=gen)] + torch.randint(-2, 3, (12, 4), generator=gen)
    gt[:, 2:] = torch.max(gt[:, 2:], gt[:, :2] + 1)
    gt = torch.cat([gt, gt[:4]])  # repeated boxes contend for the same best candidates: the later wins
    candidates = torch.cat([candidates, gt[:6], gt[:6]])  # candidates twice: ties for a box's best
    assigner = MaxIoUAssigner(0.7, 0.3, 0.3, gt_max_assign_all=assign_all)
    assert torch.equal(assigner(candidates, gt), loop_assign(assigner, candidates, gt))


def test_assigner_without_ground_truth_makes_every_candidate_negative():
    assigner = MaxIoUAssigner(0.5, 0.5)
    assert assigner(boxes([0, 0, 1, 1], [2, 2, 5, 5]), torch.zeros(0, 4)).tolist() == [0, 0]
    assert assigner(torch.zeros(0, 4), boxes([0, 0, 1, 1])).tolist() == []


def test_sampler_takes_every_candidate_when_it_wants_more():
    gt_inds = torch.tensor([0, 2, -1, 0, 1, 0])
    pos, neg = RandomSampler(num=100, pos_fraction=0.25)(gt_inds)
    assert pos.tolist() == [1, 4] and neg.tolist() == [0, 3, 5]


def test_sampler_draws_reproducibly_within_its_budget():
    gt_inds = torch.cat([torch.ones(50, dtype=torch.long), torch.zeros(200, dtype=torch.long)])[torch.randperm(250)]
    sampler = RandomSampler(num=40, pos_fraction=0.25)
    pos, neg = sampler(gt_inds, torch.Generator().manual_seed(3))
    assert len(pos) == 10 and len(neg) == 30  # negatives fill what the positives leave
    assert (gt_inds[pos] > 0).all() and (gt_inds[neg] == 0).all()
    assert (pos.diff() > 0).all() and (neg.diff() > 0).all()
    again = sampler(gt_inds, torch.Generator().manual_seed(3))
    other = sampler(gt_inds, torch.Generator().manual_seed(4))
    assert pos.tolist() == again[0].tolist() and neg.tolist() == again[1].tolist()
    assert pos.tolist() != other[0].tolist() or neg.tolist() != other[1].tolist()
    few_pos = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0])
    pos, neg = RandomSampler(num=6, pos_fraction=0.5)(few_pos, torch.Generator().manual_seed(0))
    assert len(pos) == 1 and len(neg) == 5
    pos, neg = RandomSampler(num=6, pos_fraction=0.5, neg_pos_ub=2)(few_pos, torch.Generator().manual_seed(0))
    assert len(neg) == 2


def test_ground_truth_added_as_proposals_are_positives_of_themselves():
    gt = boxes([0, 0, 10, 10], [20, 20, 40, 40])
    proposals = boxes([0, 0, 10, 9], [100, 100, 110, 110], [21, 21, 40, 40])
    assigner, sampler = MaxIoUAssigner(0.5, 0.5, 0.5, False), RandomSampler(100, 0.25)
    sampling = assign_and_sample(proposals, gt, assigner, sampler)
    assert sampling.candidates.shape == (5, 4)
    torch.testing.assert_close(sampling.candidates[:2], gt)
    assert sampling.pos_inds.tolist() == [0, 1, 2, 4] and sampling.neg_inds.tolist() == [3]
    assert sampling.pos_gt_inds.tolist() == [0, 1, 0, 1]
    assert sampling.pos_is_gt.tolist() == [True, True, False, False]
    assert sampling.avg_factor == 5
    no_gt = assign_and_sample(proposals, torch.zeros(0, 4), assigner, sampler)
    assert len(no_gt.candidates) == 3 and no_gt.pos_inds.numel() == 0 and no_gt.neg_inds.tolist() == [0, 1, 2]
    assert no_gt.avg_factor == 1 + 3  # mmdet counts an empty kind as 1


def test_inside_image_with_border():
    anchors = boxes([0, 0, 10, 10], [-1, 0, 10, 10], [0, 0, 20, 10], [0, 0, 19.5, 10])
    assert inside_image(anchors, (10.5, 20), 0).tolist() == [True, False, False, True]
    assert inside_image(anchors, (10.5, 20), 1).tolist() == [True, True, True, True]
    assert inside_image(anchors, (1, 1), -1).all()


def test_mask_targets_resample_the_mask_in_each_box():
    """A 10 x 10 square at (10, 10) of a 40 x 40 image. Its own box: the outer samples fall 0.68 px
    inside, so bilinear weights give 0.68 on the sides (1) and 0.68^2 in the corners (0); a box twice
    as large: its top-left quarter; a box over the image is clipped to the image first."""
    masks = torch.zeros(2, 40, 40, dtype=torch.uint8)
    masks[0, 10:20, 10:20] = 1
    masks[1, :, 30:] = 1
    rois = boxes([10, 10, 20, 20], [10, 10, 30, 30], [30, -10, 60, 50])
    targets = mask_targets(masks, rois, torch.tensor([0, 0, 1]), 28)
    assert targets.shape == (3, 28, 28) and targets.dtype == torch.float32
    corners = torch.ones(28, 28)
    corners[[0, 0, -1, -1], [0, -1, 0, -1]] = 0
    assert torch.equal(targets[0], corners)
    quarter = torch.zeros(28, 28)
    quarter[:14, :14] = 1
    assert torch.equal(targets[1], quarter)
    assert targets[2].eq(1).all()  # clipped to (30, 0, 40, 40): all inside the mask
    assert mask_targets(masks, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)).shape == (0, 28, 28)


def test_batch_targets_pad_the_masks_with_the_images():
    """As mmdet's DetDataPreprocessor (pad_mask): an object filling a 5 x 6 image in an 8 x 10 batch. Its
    box's last samples (0.59 of a row, 0.61 of a column inside the image) read the zero padding beyond
    the edges: 0.59 * 0.61, 0.59 * 0.82 and 0.77 * 0.61 fall below 0.5; without padding they read the edge."""
    masks = torch.ones(1, 5, 6, dtype=torch.uint8)
    targets = [dict(boxes=boxes([0, 0, 6, 5]), labels=torch.tensor([1]), masks=masks, image_size=(5, 6))]
    batched = batch_targets(targets, torch.zeros(1, 3, 8, 10))
    as_read = batch_targets([dict(targets[0], labels=torch.tensor([1], dtype=torch.int32), masks=masks.bool())],
                            torch.zeros(1, 3, 8, 10))
    assert as_read[0]['labels'].dtype == torch.int64 and torch.equal(as_read[0]['masks'], batched[0]['masks'])
    assert batched[0]['masks'].shape == (1, 8, 10) and batched[0]['masks'].sum() == 30
    assert batched[0]['masks'][:, :5, :6].eq(1).all() and targets[0]['masks'] is masks
    assert mask_targets(masks, targets[0]['boxes'], torch.tensor([0])).eq(1).all()
    expected = torch.ones(1, 28, 28)
    expected[0, [27, 27, 26], [27, 26, 27]] = 0
    assert torch.equal(mask_targets(batched[0]['masks'], targets[0]['boxes'], torch.tensor([0])), expected)


def test_train_config_takes_mmdets_names():
    cfg = train_config({'rpn': {'sampler': {'num': 10 ** 6}},
                        'rcnn': [{'sampler': {'num': 7}, 'assigner': {'type': 'MaxIoUAssigner'}}, {}, {}]})
    assert cfg['rpn']['sampler'] == dict(DEFAULT_TRAIN_CFG['rpn']['sampler'], num=10 ** 6)
    assert [stage['sampler']['num'] for stage in cfg['rcnn']] == [7, 512, 512]
    assert [stage['assigner']['pos_iou_thr'] for stage in cfg['rcnn']] == [0.5, 0.6, 0.7]
    assert DEFAULT_TRAIN_CFG['rpn']['sampler']['num'] == 256  # the defaults are not changed
    dotted = train_config({'rcnn.1.sampler.num': 9, 'rpn.assigner': {'pos_iou_thr': 0.8}, 'rpn_proposal.nms_pre': 1})
    assert [stage['sampler']['num'] for stage in dotted['rcnn']] == [512, 9, 512]
    assert dotted['rpn']['assigner'] == dict(DEFAULT_TRAIN_CFG['rpn']['assigner'], pos_iou_thr=0.8)
    assert dotted['rpn_proposal']['nms_pre'] == 1
    for bad in ('rcnn.3.sampler.num', 'rpn.sampler.num.x', 'rcnn.first.mask_size', 'rpn_proposal.nms.iou'):
        with pytest.raises(ValueError, match=f'unknown setting {bad!r}'):
            train_config({bad: 1})
    with pytest.raises(ValueError, match=r"unknown setting 'rpn.sampler.size'"):
        train_config({'rpn': {'sampler': {'size': 3}}})
    with pytest.raises(ValueError, match='rcnn needs 3 entries'):
        train_config({'rcnn': [{}]})
