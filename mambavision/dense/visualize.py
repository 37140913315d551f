"""Pictures of dense predictions: palette label maps, overlays with a legend, detections drawn on the image."""
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ['label_map_image', 'class_shares', 'format_share', 'segmentation_overlay', 'draw_detections']

Color = Tuple[int, int, int]


def _font(image_size: Tuple[int, int]) -> Union[ImageFont.FreeTypeFont, ImageFont.ImageFont]:
    """Pillow's built-in font at a size that stays readable on small and large images."""
    return ImageFont.load_default(size=max(11, round(min(image_size) / 40)))


def label_map_image(labels: np.ndarray, palette: Sequence[Color]) -> Image.Image:
    """An (H, W) class map (values < 256) as a PIL 'P' image whose palette entry i is class i's color."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f'expected an (H, W) map of classes 0..255, got shape {labels.shape}')
    image = Image.fromarray(labels.astype(np.uint8), mode='P')
    flat = [c for color in palette[:256] for c in color]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image


def class_shares(labels: np.ndarray, num_classes: int) -> List[Tuple[int, float]]:
    """(class, fraction of the pixels) of the classes present in an (H, W) class map, largest first."""
    counts = np.bincount(np.asarray(labels).ravel(), minlength=num_classes)
    return [(int(c), counts[c] / counts.sum()) for c in np.argsort(-counts, kind='stable') if counts[c]]


def format_share(share: float) -> str:
    """A fraction as a percentage with one decimal ('<0.1%' for a few pixels rather than '0.0%')."""
    return f'{100 * share:.1f}%' if share >= 0.0005 else '<0.1%'


def segmentation_overlay(image: np.ndarray, labels: np.ndarray, palette: Sequence[Color],
                         class_names: Sequence[str], alpha: float = 0.5) -> Image.Image:
    """The (H, W, 3) uint8 RGB ``image`` with the class colors blended in at ``alpha``, and on its right
    a legend of the classes present (largest area first), each with its color and share of the image."""
    blended = Image.blend(Image.fromarray(image), label_map_image(labels, palette).convert('RGB'), alpha)
    entries = [(tuple(palette[c]), f'{class_names[c]} {format_share(share)}')
               for c, share in class_shares(labels, len(palette))]
    font = _font(blended.size)
    row = round(font.size * 1.5)
    per_column = max(1, blended.height // row - 1)  # as many columns as it takes to stay within the image's height
    column_width = 3 * round(font.size) + max(round(font.getlength(text)) for _, text in entries)
    canvas = Image.new('RGB', (blended.width + -(-len(entries) // per_column) * column_width,
                               max(blended.height, row * (min(len(entries), per_column) + 1))), 'white')
    canvas.paste(blended, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (color, text) in enumerate(entries):
        column, line = divmod(i, per_column)
        x, y = blended.width + column * column_width + font.size // 2, row // 2 + line * row
        draw.rectangle([x, y, x + font.size, y + font.size], fill=color, outline='black')
        draw.text((x + 3 * font.size // 2, y), text, fill='black', font=font)
    return canvas


def _draw_masks(picture: torch.Tensor, masks: torch.Tensor, colors: Sequence[Color], alpha: float):
    """Blend (N, H, W) masks into a (3, H, W) uint8 picture in place, one at a time on the crop that holds it
    (fast on large images; overlaps blend, best detection on top, where one call would paint them black)."""
    rows, columns = masks.any(2), masks.any(1)
    for i in reversed(range(len(masks))):
        if rows[i].any():
            ys, xs = rows[i].nonzero()[:, 0], columns[i].nonzero()[:, 0]
            window = (slice(int(ys[0]), int(ys[-1]) + 1), slice(int(xs[0]), int(xs[-1]) + 1))
            crop = picture[:, window[0], window[1]]
            crop.copy_(draw_segmentation_masks(crop.contiguous(), masks[i][window].contiguous(), alpha, colors[i]))


def draw_detections(image: np.ndarray, detections: dict, class_names: Sequence[str], palette: Sequence[Color],
                    alpha: float = 0.5) -> Image.Image:
    """The (H, W, 3) uint8 RGB ``image`` with each detection's mask, box and "class score" label drawn
    (torchvision's drawing utilities for masks and boxes, in the class color)."""
    picture = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    labels, scores = detections['labels'].tolist(), detections['scores'].tolist()
    colors = [tuple(palette[label]) for label in labels]
    if labels:
        if 'masks' in detections:
            _draw_masks(picture, torch.as_tensor(detections['masks']).bool(), colors, alpha)
        width = max(1, round(min(image.shape[:2]) / 300))
        picture = draw_bounding_boxes(picture, torch.as_tensor(detections['boxes']).float(), colors=colors,
                                      width=width)
    drawn = Image.fromarray(picture.permute(1, 2, 0).numpy())
    draw, font = ImageDraw.Draw(drawn), _font(drawn.size)
    for box, label, score, color in zip(detections['boxes'].tolist(), labels, scores, colors):
        text = f'{class_names[label]} {score:.2f}'
        y = max(0, box[1] - font.size - 2)  # above the box, or inside it at the top edge
        left, top, right, bottom = draw.textbbox((box[0] + 1, y), text, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=color)
        draw.text((box[0] + 1, y), text, font=font, fill='white' if sum(color) < 384 else 'black')
    return drawn
