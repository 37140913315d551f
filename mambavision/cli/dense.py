"""The dense commands: ``mambavision segment``, ``mambavision detect`` and ``mambavision validate --task seg|det``.

``segment`` writes per image ``<stem>_labels.png`` (the class map as a palette PNG: pixel value =
class index, colors = the model's palette) and ``<stem>_overlay.png`` (the colors on the image,
with a legend of the classes present). ``detect`` writes per image ``<stem>_detections.png``
(masks, boxes and "class score" drawn) and ``<stem>_detections.json`` (COCO results; ``image_id``
is the image's position among the inputs, from 0). The weights: ``--checkpoint FILE``, else the published ones
(from the Hugging Face cache, or downloaded into it); when those cannot be had, one line says which file to
download and where it goes. ``--random-weights`` runs the model untrained (to try the command offline).
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from mambavision.dense.evaluate import (
    COCO_CATEGORY_IDS, ade20k_samples, coco_image_paths, coco_results, evaluate_detector, evaluate_segmenter, load_coco,
)
from mambavision.dense.image import as_rgb_images
from mambavision.dense.visualize import (
    class_shares, draw_detections, format_share, label_map_image, segmentation_overlay,
)
from mambavision.images import image_files, open_image
from mambavision.runtime import UserError, amp_autocast, check_output_folder, one_line, resolve_device

__all__ = ['add_arguments_segment', 'run_segment', 'add_arguments_detect', 'run_detect', 'validate_dense']

DEFAULT_SEGMENTER = 'upernet_mambavision_t.nv_ade20k'
DEFAULT_DETECTOR = 'cascade_mask_rcnn_mambavision_t.nv_coco'


def create_dense_model(task: str, name: str, checkpoint: Optional[str], device: Optional[torch.device] = None,
                       random_weights: bool = False, random_flag: Optional[str] = '--random-weights'):
    """The segmenter ('seg') or detector ('det') ``name`` with a local ``checkpoint``, the published weights
    (cache or hub), or (``random_weights``) random ones, in eval mode on ``device``; every failure is one line
    (published weights that cannot be had: which file to download, and ``--checkpoint`` or ``random_flag``)."""
    import mambavision
    from mambavision.dense.factory import published_entry
    from mambavision.factory import fetch_published_weights

    factory = mambavision.create_segmenter if task == 'seg' else mambavision.create_detector
    if checkpoint and not os.path.isfile(checkpoint):
        raise UserError(f'checkpoint not found: {checkpoint}')
    try:
        if random_weights:
            command = 'segment' if task == 'seg' else 'detect'
            print(f'mambavision {command}: RANDOM weights (--random-weights): the outputs mean nothing',
                  file=sys.stderr)
        elif not checkpoint:
            try:
                entry = published_entry(task, name)
            except ValueError:  # not a published name: the factory names the mistake (or takes a model of one's own)
                entry = None
            if entry is not None:  # into the local cache, where the factory finds it; or one line: what to do
                fetch_published_weights(name, entry.hf_repo, entry.hf_file, '--checkpoint', random_flag)
        model = factory(name, pretrained=not (checkpoint or random_weights), checkpoint_path=checkpoint)
    except ValueError as e:  # unknown name (with close names), bad option
        raise UserError(one_line(e)) from None
    except (RuntimeError, OSError) as e:  # unreadable or mismatched weight file
        raise UserError(one_line(e)) from None
    return model.eval().to(device or 'cpu')


def _add_common(parser: argparse.ArgumentParser, default_model: str):
    parser.add_argument('images', nargs='+', metavar='IMAGE',
                        help='image files or folders (searched recursively for .jpg, .png, ... files)')
    parser.add_argument('--model', default=default_model, help=f'model name (default {default_model})')
    parser.add_argument('--checkpoint', metavar='FILE',
                        help='local weight file: a published .pth (mmengine checkpoint) or our own saved weights')
    parser.add_argument('--random-weights', action='store_true',
                        help='run the model with random weights (no download; the outputs mean nothing)')
    parser.add_argument('--output', required=True, metavar='DIR', help='folder for the pictures (created if needed)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), help='default cuda when available')


def _read_images(paths: List[str], output: str) -> Dict[str, str]:
    """Output stem of each image path (its file stem, made unique; folders give the images in them); every image
    is checked to be readable, and ``output`` to be a folder or not yet there."""
    check_output_folder(output)
    stems: Dict[str, str] = {}
    for path in image_files(paths):
        open_image(path, decode=False)
        stem = Path(path).stem
        stems[path] = stem if stem not in stems.values() else f'{stem}_{len(stems)}'
    return stems


def _predict(model, path: str, **options):
    """(the (H, W, 3) uint8 RGB image at ``path``, the model's prediction for it)."""
    image = as_rgb_images(path)[0]
    with torch.inference_mode():
        return image, model.predict(image, **options)[0]


def add_arguments_segment(parser: argparse.ArgumentParser):
    _add_common(parser, DEFAULT_SEGMENTER)


def run_segment(args) -> int:
    stems = _read_images(args.images, args.output)
    device = resolve_device(args.device)
    model = create_dense_model('seg', args.model, args.checkpoint, device, args.random_weights)
    os.makedirs(args.output, exist_ok=True)
    for path, stem in stems.items():
        image, result = _predict(model, path, return_logits=False)  # labels alone: no (classes, H, W) logits
        labels = result['labels'].cpu().numpy()
        label_file, overlay_file = (os.path.join(args.output, f'{stem}_{kind}.png') for kind in ('labels', 'overlay'))
        label_map_image(labels, model.palette).save(label_file)
        segmentation_overlay(image, labels, model.palette, model.class_names).save(overlay_file)
        largest = ', '.join(f'{model.class_names[c]} {format_share(share)}'
                            for c, share in class_shares(labels, len(model.class_names))[:5])
        print(f'{path}: {label_file}, {overlay_file} ({largest})')
    return 0


def add_arguments_detect(parser: argparse.ArgumentParser):
    _add_common(parser, DEFAULT_DETECTOR)
    parser.add_argument('--score-threshold', type=float, default=0.3, metavar='S',
                        help='draw and write the detections scoring above S (default 0.3)')


def run_detect(args) -> int:
    stems = _read_images(args.images, args.output)
    device = resolve_device(args.device)
    model = create_dense_model('det', args.model, args.checkpoint, device, args.random_weights)
    # label -> COCO category id for the 80 COCO classes, else label + 1
    category_ids = COCO_CATEGORY_IDS if len(model.class_names) == len(COCO_CATEGORY_IDS) else \
        range(1, len(model.class_names) + 1)
    os.makedirs(args.output, exist_ok=True)
    for image_id, (path, stem) in enumerate(stems.items()):
        image, result = _predict(model, path)
        kept = int((result['scores'] > args.score_threshold).sum())  # best first: the kept lead (a view, no copy)
        detections = {k: v[:kept].cpu() for k, v in result.items()}
        picture_file, json_file = (os.path.join(args.output, f'{stem}_detections.{ext}') for ext in ('png', 'json'))
        draw_detections(image, detections, model.class_names, model.palette).save(picture_file)
        with open(json_file, 'w') as f:
            json.dump(coco_results([detections], [image_id], category_ids), f)
        names = [model.class_names[label] for label in detections['labels'].tolist()]
        found = ', '.join(f'{names.count(n)} {n}' for n in dict.fromkeys(names)) or 'nothing'
        print(f'{path}: {picture_file}, {json_file} (image_id {image_id}: {found} above {args.score_threshold})')
    return 0


# ---------------------------------------------------------------------------------------------
# mambavision validate --task seg | det


def _progress(desc: str):
    from tqdm import tqdm

    return lambda iterable: tqdm(iterable, desc=desc, total=len(iterable), disable=None, dynamic_ncols=True,
                                 leave=False, file=sys.stderr)


def validate_dense(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """``mambavision validate --task seg`` (ADE20K: aAcc, mIoU, mAcc) or ``--task det`` (COCO: box and mask AP),
    in percent; ``--per-class`` adds each class's."""
    if torch.distributed.is_initialized():
        raise UserError(f'--task {args.task} runs in one process: start it without torchrun')
    if args.ema:
        raise UserError(f'--ema applies to classification training checkpoints, not to --task {args.task}')
    if args.task == 'det' and not args.annotations:
        raise UserError('--task det needs --annotations FILE, the COCO instances json '
                        '(e.g. annotations/instances_val2017.json)')
    try:  # the data is checked before the model is built
        if args.task == 'seg':
            samples = ade20k_samples(args.data_dir, args.val_split)
        else:
            coco = load_coco(args.annotations)
            split_dir = Path(args.data_dir) / Path(args.annotations).stem.removeprefix('instances_')
            image_paths = coco_image_paths(coco, str(split_dir if split_dir.is_dir() else args.data_dir))
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise UserError(one_line(e)) from None
    model = create_dense_model(args.task, args.model, args.checkpoint, device, random_flag=None)
    header = dict(model=args.model, checkpoint=args.checkpoint or 'pretrained', task=args.task)
    options = dict(autocast=lambda: amp_autocast(device.type, args.amp), progress=_progress(f'validate {args.task}'),
                   per_class=args.per_class)
    try:
        if args.task == 'seg':
            return dict(header, **evaluate_segmenter(model, samples, **options))
        return dict(header, **evaluate_detector(model, coco, image_paths, **options))
    except ValueError as e:  # a label of another size than its image, another class count than the model's
        raise UserError(f'{args.annotations or args.data_dir}: {one_line(e)}') from None
