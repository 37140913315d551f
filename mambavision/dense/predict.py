"""The one ``predict`` loop of the dense models: images -> resize and normalise -> groups of one size ->
chunks -> forward -> postprocess."""
from collections import defaultdict
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .transform import ImageTransform

__all__ = ['predict_images']

Sizes = List[Tuple[int, int]]


@torch.no_grad()
def predict_images(
        model: nn.Module, images: Sequence[np.ndarray], transform: ImageTransform, batch_size: int,
        run: Callable[[torch.Tensor, Sizes, Sizes], List[Dict[str, torch.Tensor]]],
) -> List[Dict[str, torch.Tensor]]:
    """``model``'s results for (H, W, 3) uint8 RGB ``images``, one dict of CPU tensors each, in order.

    Each image goes through ``transform.preprocess``; images that ``transform.padded_size`` gives the
    same size run together, up to ``batch_size`` at a time, as one ``transform.pad_batch`` on the
    model's device and dtype, through ``run(batch, image_sizes, original_sizes)`` (the images' (h, w)
    inside the padding and before the resize) which returns one dict per image. The model runs in
    eval mode; the mode it was in is restored.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}')
    inputs = [transform.preprocess(image)[0] for image in images]
    groups: Dict[Tuple[int, int], List[int]] = defaultdict(list)
    for i, x in enumerate(inputs):
        groups[transform.padded_size(x)].append(i)
    weight = next(model.parameters())
    results: List[Dict[str, torch.Tensor]] = [{}] * len(images)
    was_training = model.training
    model.eval()
    try:
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                batch = transform.pad_batch([inputs[i] for i in chunk]).to(weight.device, weight.dtype)
                image_sizes = [(inputs[i].shape[1], inputs[i].shape[2]) for i in chunk]  # (h, w) of (3, h, w)
                outputs = run(batch, image_sizes, [images[i].shape[:2] for i in chunk])
                for i, out in zip(chunk, outputs):
                    results[i] = {k: v.cpu() for k, v in out.items()}
    finally:
        model.train(was_training)
    return results
