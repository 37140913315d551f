"""Pictures of dense predictions (mambavision/dense/visualize.py), checked pixel by pixel where they are defined."""
import numpy as np
import pytest
import torch

from mambavision.dense.visualize import (
    class_shares, draw_detections, format_share, label_map_image, segmentation_overlay,
)

PALETTE = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]
NAMES = ['red', 'green', 'blue', 'yellow']


def _labels():
    labels = np.zeros((40, 60), np.uint8)
    labels[:, 20:] = 2
    labels[30:, 50:] = 3
    return labels


def test_label_map_image_is_the_class_index_with_the_palette():
    image = label_map_image(_labels(), PALETTE)
    assert image.mode == 'P' and np.array_equal(np.array(image), _labels())
    rgb = np.array(image.convert('RGB'))
    assert tuple(rgb[0, 0]) == PALETTE[0] and tuple(rgb[0, 30]) == PALETTE[2] and tuple(rgb[35, 55]) == PALETTE[3]


@pytest.mark.parametrize('bad', [np.zeros((2, 3, 3)), np.full((2, 2), 256), np.full((2, 2), -1)])
def test_label_map_image_refuses_what_is_not_a_class_map(bad):
    with pytest.raises(ValueError, match='expected an \\(H, W\\) map of classes 0..255'):
        label_map_image(bad, PALETTE)


def test_class_shares_and_their_format():
    shares = class_shares(_labels(), 4)
    assert [c for c, _ in shares] == [2, 0, 3]  # largest first, absent classes left out
    assert sum(s for _, s in shares) == pytest.approx(1)
    assert shares[2][1] == pytest.approx(100 / 2400)
    assert format_share(0.5) == '50.0%' and format_share(0.0004) == '<0.1%' and format_share(0.0005) == '0.1%'


def test_overlay_blends_the_colors_and_adds_a_legend_of_the_classes_present():
    image = np.full((40, 60, 3), 100, np.uint8)
    overlay = segmentation_overlay(image, _labels(), PALETTE, NAMES, alpha=0.5)
    pixels = np.array(overlay)
    assert overlay.height == 40 and overlay.width > 60  # the legend stands on the right
    assert np.abs(pixels[5, 5].astype(int) - [178, 50, 50]).max() <= 1  # (100 + 255) / 2, 100 / 2, 100 / 2
    assert np.abs(pixels[5, 30].astype(int) - [50, 50, 178]).max() <= 1
    legend = pixels[:, 60:]
    for color in (PALETTE[0], PALETTE[2], PALETTE[3]):
        assert (legend == color).all(-1).any(), color
    assert not (legend == PALETTE[1]).all(-1).any()  # green is absent from the map


def test_legend_of_many_classes_stays_within_the_image_height():
    palette = [(i, 255 - i, (7 * i) % 256) for i in range(120)]
    labels = np.arange(120, dtype=np.uint8).repeat(10)[None].repeat(200, 0)
    overlay = segmentation_overlay(np.zeros((200, 1200, 3), np.uint8), labels, palette, [f'c{i}' for i in range(120)])
    assert overlay.height == 200  # one list would be 120 rows of 16 px: it is laid out in columns instead
    legend = np.array(overlay)[:, 1200:]
    assert all((legend == color).all(-1).any() for color in palette)


def test_draw_detections_paints_masks_boxes_and_labels_in_the_class_color():
    image = np.zeros((120, 160, 3), np.uint8)
    masks = torch.zeros(2, 120, 160, dtype=torch.bool)
    masks[0, 40:80, 20:60] = True
    masks[1, 60:100, 100:150] = True
    detections = dict(boxes=torch.tensor([[20., 40., 60., 80.], [100., 60., 150., 100.]]),
                      scores=torch.tensor([0.9, 0.6]), labels=torch.tensor([1, 2]), masks=masks)
    drawn = np.array(draw_detections(image, detections, NAMES, PALETTE, alpha=0.5))
    assert drawn.shape == image.shape
    assert np.abs(drawn[70, 40].astype(int) - [0, 128, 0]).max() <= 1  # inside mask 0, below its label: green
    assert np.abs(drawn[90, 125].astype(int) - [0, 0, 128]).max() <= 1  # inside mask 1: blue at half strength
    assert tuple(drawn[110, 5]) == (0, 0, 0)  # nothing drawn far from both
    assert tuple(drawn[80, 40]) == PALETTE[1] and tuple(drawn[100, 125]) == PALETTE[2]  # bottom edges of the boxes
    label_rows = drawn[25:40, 20:60]
    assert (label_rows == PALETTE[1]).all(-1).mean() > 0.3  # the "green 0.90" label's background above box 0


def test_draw_detections_without_masks_or_detections():
    image = np.full((100, 120, 3), 7, np.uint8)
    nothing = dict(boxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.int64))
    assert np.array_equal(np.array(draw_detections(image, nothing, NAMES, PALETTE)), image)
    boxes_only = dict(boxes=torch.tensor([[40., 50., 80., 90.]]), scores=torch.tensor([0.5]), labels=torch.tensor([0]))
    drawn = np.array(draw_detections(image, boxes_only, NAMES, PALETTE))
    assert tuple(drawn[90, 60]) == PALETTE[0] and tuple(drawn[70, 60]) == (7, 7, 7)  # edge drawn, inside untouched
