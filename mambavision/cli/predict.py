"""``mambavision predict``: ImageNet top-k classes of image files."""
import argparse

from . import int_at_least

__all__ = ['add_arguments_predict', 'run_predict']

PREDICT_BATCH_SIZE = 16


def add_arguments_predict(parser: argparse.ArgumentParser):
    from mambavision.factory import DEFAULT_MODEL

    parser.add_argument('images', nargs='*', metavar='IMAGE',
                        help='image files (default: a sample image shipped with the package)')
    parser.add_argument('--model', default=DEFAULT_MODEL,
                        help=f'model name, optionally with a weight tag (default {DEFAULT_MODEL})')
    parser.add_argument('--checkpoint', metavar='PATH',
                        help='local weight file (.pth.tar as published, .pth, .safetensors) instead of the hub')
    parser.add_argument('--topk', type=int_at_least(1), default=5, metavar='K',
                        help='classes shown per image (default 5)')
    parser.add_argument('--require-weights', action='store_true',
                        help='fail when pretrained weights cannot be had, instead of predicting with random weights')


def run_predict(args) -> int:
    import torch
    from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_model_data_config

    from mambavision.factory import check_model_name, create_model_with_weights
    from mambavision.images import open_image, sample_image

    check_model_name(args.model)
    paths = args.images or [str(sample_image())]
    for path in paths:  # fail before building the model
        open_image(path, decode=False)
    model = create_model_with_weights(
        'predict', args.model, args.checkpoint, args.require_weights,
        '--checkpoint PATH loads a local file; --require-weights refuses random weights').eval()
    transform = create_transform(**resolve_model_data_config(model))
    subset = infer_imagenet_subset(model)
    labels = ImageNetInfo(subset) if subset else None
    for start in range(0, len(paths), PREDICT_BATCH_SIZE):
        batch = paths[start:start + PREDICT_BATCH_SIZE]
        with torch.inference_mode():
            probs = model(torch.stack([transform(open_image(p)) for p in batch])).float().softmax(dim=-1)
        top_p, top_i = probs.topk(min(args.topk, probs.shape[-1]), dim=-1)
        for path, ps, idx in zip(batch, top_p.tolist(), top_i.tolist()):
            print(path)
            for rank, (p, i) in enumerate(zip(ps, idx), 1):
                name = labels.index_to_description(i) if labels else f'class {i}'
                print(f'  {rank}. {100 * p:6.2f}%  {name} ({i})')
    return 0
