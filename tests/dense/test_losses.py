"""Detector loss functions against hand-computed values."""
import torch

from mambavision.dense.losses import accuracy, giou_loss, smooth_l1_loss, total_loss, weighted_mean


def test_giou_loss():
    pred = torch.tensor([[0., 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]])
    target = torch.tensor([[0., 0, 10, 10], [5, 5, 15, 15], [20, 0, 30, 10]])
    # identical: 0; overlap 25 of union 175 in an enclosing 225; apart: iou 0, enclosure 300 of which 100 empty
    expected = torch.tensor([0., 1 - (25 / 175 - 50 / 225), 1 + 100 / 300])
    torch.testing.assert_close(giou_loss(pred, target), expected)


def test_smooth_l1_and_weighted_mean():
    pred, target = torch.tensor([0., 0.05, 1.]), torch.zeros(3)
    beta = 0.1
    expected = torch.tensor([0., 0.5 * 0.05 ** 2 / beta, 1 - 0.05])
    torch.testing.assert_close(smooth_l1_loss(pred, target, beta), expected)
    torch.testing.assert_close(weighted_mean(expected, torch.tensor([1., 1, 0]), 4.), expected[1] / 4)


def test_accuracy_and_total():
    logits = torch.tensor([[2., 1], [0, 3], [5, 1], [0, 1]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 1])).item() == 75.
    assert accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).item() == 0
    losses = {'loss_rpn_cls.0': torch.tensor(1.), 's0.acc': torch.tensor(50.), 's0.loss_cls': torch.tensor(2.)}
    assert total_loss(losses).item() == 3.
