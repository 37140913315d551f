"""``mambavision predict``: ImageNet top-k classes of image files and folders."""
import argparse

from . import int_at_least

__all__ = ['add_arguments_predict', 'run_predict']

PREDICT_BATCH_SIZE = 16


def add_arguments_predict(parser: argparse.ArgumentParser):
    from mambavision.factory import DEFAULT_MODEL

    parser.add_argument('images', nargs='*', metavar='IMAGE',
                        help='image files or folders (searched recursively for .jpg, .png, ... files); '
                             'default: a sample image shipped with the package')
    parser.add_argument('--model', default=DEFAULT_MODEL,
                        help=f'model name, optionally with a weight tag (default {DEFAULT_MODEL})')
    parser.add_argument('--checkpoint', metavar='FILE',
                        help='local weight file (.pth.tar as published, .pth, .safetensors) instead of the hub')
    parser.add_argument('--random-weights', action='store_true',
                        help='run the model with random weights (no download; the outputs mean nothing)')
    parser.add_argument('--topk', type=int_at_least(1), default=5, metavar='K',
                        help='classes shown per image (default 5)')
    parser.add_argument('--device', help="'cpu', 'cuda' or 'cuda:N' (default: cuda when available)")
    parser.add_argument('--json', action='store_true',
                        help='print one JSON object: the model and, per image, its path and top-k classes '
                             '(index, label, percent)')


def run_predict(args) -> int:
    import json

    import torch
    from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_model_data_config

    from mambavision.factory import check_classifier_name, create_model_with_weights
    from mambavision.images import image_files, open_image, sample_image
    from mambavision.runtime import UserError, resolve_device

    check_classifier_name(args.model)
    device = resolve_device(args.device)
    paths = image_files(args.images) if args.images else [str(sample_image())]
    for path in paths:  # fail before building the model
        open_image(path, decode=False)
    model = create_model_with_weights('predict', args.model, args.checkpoint, args.random_weights,
                                      sample_run=not args.images).eval().to(device)
    if model.num_classes == 0:  # its outputs are pooled features, not class scores
        raise UserError(f'{args.checkpoint} holds no classifier (a backbone or a dense model\'s weights): predict '
                        f'needs a classification checkpoint (head.fc); for its features use forward_features')
    transform = create_transform(**resolve_model_data_config(model))
    label_names = model.pretrained_cfg.get('label_names')
    subset = None if label_names else infer_imagenet_subset(model)
    imagenet = ImageNetInfo(subset) if subset else None

    def label(index: int) -> str:
        if label_names and index < len(label_names):
            return str(label_names[index])
        return imagenet.index_to_description(index) if imagenet else f'class {index}'

    results = []
    for start in range(0, len(paths), PREDICT_BATCH_SIZE):
        batch = paths[start:start + PREDICT_BATCH_SIZE]
        x = torch.stack([transform(open_image(p)) for p in batch]).to(device)
        with torch.inference_mode():
            probs = model(x).float().softmax(dim=-1).cpu()
        top_p, top_i = probs.topk(min(args.topk, probs.shape[-1]), dim=-1)
        for path, ps, idx in zip(batch, top_p.tolist(), top_i.tolist()):
            top = [dict(index=i, label=label(i), percent=round(100 * p, 4)) for p, i in zip(ps, idx)]
            if args.json:
                results.append(dict(image=path, top=top))
                continue
            print(path)
            for rank, t in enumerate(top, 1):
                print(f'  {rank}. {t["percent"]:6.2f}%  {t["label"]} ({t["index"]})')
    if args.json:
        print(json.dumps(dict(model=args.model, results=results), indent=2))
    return 0
