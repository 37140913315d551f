"""The image transform's postprocessing: masks pasted into the image."""
import pytest
import torch

from mambavision.dense import transform
from mambavision.dense.transform import paste_masks, zero_masks


@pytest.mark.parametrize('lazy_from', [0, 2 ** 40])
def test_pasted_masks_are_the_same_on_lazily_zeroed_memory(monkeypatch, lazy_from):
    """Masks on a lazily zeroed mapping (from LAZY_ZEROS_BYTES on) equal masks pasted into ``torch.zeros``."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.rand(5, 28, 28, generator=generator)
    xy = torch.rand(5, 2, generator=generator) * torch.tensor([90., 60.])
    boxes = torch.cat([xy, xy + 1 + torch.rand(5, 2, generator=generator) * 40], dim=1)
    expected = torch.zeros(5, 70, 100, dtype=torch.bool)
    for i, box in enumerate(boxes):
        pasted, region = transform.paste_mask(probs[i], box, (70, 100))
        expected[(i, *region)] = pasted >= 0.5
    monkeypatch.setattr(transform, 'LAZY_ZEROS_BYTES', lazy_from)
    masks = paste_masks(probs, boxes, (70, 100), 0.5)
    assert masks.dtype == torch.bool and masks.shape == (5, 70, 100) and masks.any()
    assert torch.equal(masks, expected)
    assert torch.equal(paste_masks(probs[:0], boxes[:0], (70, 100), 0.5), torch.zeros(0, 70, 100, dtype=torch.bool))


def test_lazily_zeroed_masks_are_ordinary_tensors(monkeypatch):
    monkeypatch.setattr(transform, 'LAZY_ZEROS_BYTES', 0)
    masks = zero_masks((3, 50, 40), torch.device('cpu'))
    assert not masks.any() and masks.is_contiguous()
    masks[1, 2:5] = True
    view = masks[1]
    del masks  # the view keeps the mapping alive
    assert view.sum() == 3 * 40 and view.clone().sum() == 3 * 40
