"""Box operations of the detector: box coding both ways and the RoI level mapping."""
import torch

from mambavision.dense.boxes import bbox2delta, delta2bbox, roi_levels

STDS = (0.1, 0.1, 0.2, 0.2)


def test_bbox2delta_inverts_delta2bbox():
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 50, 2, generator=generator) * 100
    rois, targets = torch.cat([xy, xy + 1 + torch.rand(2, 50, 2, generator=generator) * 60], dim=2)  # sizes 1-61
    deltas = bbox2delta(rois, targets, STDS)
    torch.testing.assert_close(delta2bbox(rois, deltas, STDS), targets, atol=1e-4, rtol=0)
    # the encoding by hand: centre shift over the size, log of the size ratio, over the stds
    size, target_size = rois[:, 2:] - rois[:, :2], targets[:, 2:] - targets[:, :2]
    shift = ((targets[:, :2] + targets[:, 2:]) - (rois[:, :2] + rois[:, 2:])) / 2 / size
    expected = torch.cat([shift, (target_size / size).log()], dim=1) / torch.tensor(STDS)
    torch.testing.assert_close(deltas, expected)


def test_delta2bbox_clips_to_the_image_only_when_asked():
    rois, deltas = torch.tensor([[10., 10., 50., 30.]]), torch.tensor([[3., -3., 0.5, 0.5]])
    free = delta2bbox(rois, deltas)
    assert free[0, 2] > 100 and free[0, 1] < 0
    clipped = delta2bbox(rois, deltas, max_shape=(40, 100))
    assert torch.equal(clipped, torch.stack([free[:, 0].clamp(0, 100), free[:, 1].clamp(0, 40),
                                             free[:, 2].clamp(0, 100), free[:, 3].clamp(0, 40)], dim=1))


def test_roi_levels_follow_the_square_root_of_the_area():
    """mmdet's mapping: sqrt(area) < 112 -> 0, < 224 -> 1, < 448 -> 2, else 3."""
    sides = torch.tensor([1., 55.9, 111.9, 112., 223.9, 224., 447.9, 448., 2000.])
    rois = torch.stack([torch.zeros_like(sides), 5 + 0 * sides, 5 + 0 * sides, 5 + sides, 5 + sides], dim=1)
    assert roi_levels(rois, 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3]
