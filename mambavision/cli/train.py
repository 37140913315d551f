"""``mambavision train`` and ``mambavision validate``: the options of the trainer (``mambavision.train``)
and of the dense evaluations (``--task seg|det``)."""
import argparse
import json

from mambavision.train import OPTIONS

__all__ = ['add_arguments_train', 'run_train', 'add_arguments_validate', 'run_validate']


def _option(key: str) -> str:
    return '--' + key.replace('_', '-')


def _add_config_options(parser: argparse.ArgumentParser, sections):
    for section in sections:
        group = parser.add_argument_group(f'{section} (override the config\'s {section} section)')
        for key, spec in OPTIONS[section].items():
            spec = dict(spec)
            default = spec.pop('default', None)
            spec['help'] += f' (default: {"from the model" if section == "data" else default})'
            group.add_argument(_option(key), dest=key, default=None, **spec)


def _add_common(parser: argparse.ArgumentParser):
    parser.add_argument('--data-dir', required=True,
                        help='dataset root (ImageFolder: DIR/train/<class>/*, DIR/val/<class>/*); '
                             'validate also takes DIR/<class>/*')
    parser.add_argument('--dataset', default='', help="timm dataset spec, e.g. 'torch/cifar10' ('' = image folders)")
    parser.add_argument('--val-split', default='validation', help='validation split (folder name or synonym)')
    parser.add_argument('--img-size', type=int, help='square input size, shortcut for --input-size 3 S S')
    parser.add_argument('--num-classes', type=int, help='classifier size (default: from the data or checkpoint)')
    parser.add_argument('--amp', choices=['bf16', 'fp16'], help='mixed precision (fp16 uses loss scaling)')
    parser.add_argument('--device', help="'cpu', 'cuda' (default: cuda when available; torchrun: one GPU per rank)")
    parser.add_argument('--workers', type=int, default=4, help='data-loading processes per rank (default: 4)')


def add_arguments_train(parser: argparse.ArgumentParser):
    """Options of ``mambavision train``."""
    parser.add_argument('--config', help='YAML config (configs/*.yaml); options given here override it')
    parser.add_argument('--model', help='timm model name, e.g. mambavision_t or mambavision_t.nv_in1k')
    _add_common(parser)
    parser.add_argument('--train-split', default='train', help='training split (folder name or synonym)')
    parser.add_argument('--pretrained', action='store_true', help='start from the published weights')
    parser.add_argument('--pretrained-file', help='local weight file for --pretrained (instead of the hub)')
    parser.add_argument('--grad-checkpointing', action='store_true', help='recompute activations to save memory')
    parser.add_argument('--sync-bn', action='store_true', help='synchronise BatchNorm statistics across GPUs')
    parser.add_argument('--output', help='output folder (default: output/<model>-<time>)')
    parser.add_argument('--resume', help='continue from this checkpoint (e.g. OUT/last.pth.tar)')
    parser.add_argument('--seed', type=int, default=42, help='random seed (each rank adds its rank)')
    _add_config_options(parser, ('data', 'train'))
    _add_dense_options(parser)


def _add_dense_options(parser: argparse.ArgumentParser):
    """``train --task seg|det``: fine-tune a segmenter or detector (``mambavision.dense.train``)."""
    group = parser.add_argument_group(
        'dense (--task seg|det: the published recipe by default; --lr, --weight-decay, --batch-size (per process), '
        '--epochs (det), --drop-path, --clip-grad, --amp, --resume, --seed apply too)')
    group.add_argument('--task', choices=('cls', 'seg', 'det'), default='cls',
                       help='cls: image classification (default); seg: a UPerNet on a segmentation folder or ADE20K; '
                            'det: a Cascade Mask R-CNN on a COCO or YOLO dataset')
    group.add_argument('--iters', type=int, help='seg: training iterations (default 160000)')
    group.add_argument('--warmup-iters', type=int, help='linear warm-up iterations (default 1500 seg, 1000 det)')
    group.add_argument('--total-batch', type=int, default=16,
                       help='images per optimiser step = batch size x processes x accumulation (default 16)')
    group.add_argument('--eval-interval', type=int,
                       help='validate every N iterations (seg, default 16000) or epochs (det, default 1)')
    group.add_argument('--backbone', help='start from ImageNet weights in the backbone: a tag such as '
                                          'mambavision_t.nv_in1k or a classification weight file')
    group.add_argument('--val-data', help='another folder for validation (default: the val split of --data-dir)')
    group.add_argument('--crop-size', type=int, help='seg: training crop (default: the published 512, L3 640)')


def add_arguments_validate(parser: argparse.ArgumentParser):
    """Options of ``mambavision validate``."""
    parser.add_argument('--model', required=True, help='timm model name, e.g. mambavision_t.nv_in1k')
    parser.add_argument('--task', choices=('cls', 'seg', 'det'), default='cls',
                        help='cls: image folders (default); seg: a segmenter on ADE20K (--data-dir '
                             'ADEChallengeData2016); det: a detector on COCO (--data-dir images, --annotations)')
    parser.add_argument('--annotations', help='--task det: the COCO instances json')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--checkpoint', help='weight file: a training checkpoint of ours or a published one')
    source.add_argument('--pretrained', action='store_true', help="the model's published weights")
    parser.add_argument('--ema', action='store_true', help="use a training checkpoint's EMA weights")
    _add_common(parser)
    parser.add_argument('--batch-size', type=int, default=64, help='images per process and step')
    parser.add_argument('--results-file', help='also write the results (JSON) here')
    parser.add_argument('--per-class', action='store_true',
                        help="also each class's metrics (percent, as every metric): top-1, IoU and Acc, or AP")
    _add_config_options(parser, ('data',))


def _fetch_pretrained(name: str, local_flag: str):
    """Published weights of ``name`` into the Hugging Face cache before the run starts; offline, one line naming
    the file and ``local_flag``, the option that takes a local copy."""
    from mambavision.factory import fetch_published_weights, published_weights

    source = published_weights(name)
    if source is not None:
        fetch_published_weights(name, *source, local_flag=local_flag)


def run_train(args: argparse.Namespace) -> int:
    """``mambavision train``: train or fine-tune, single-process or under torchrun."""
    import os
    import sys

    from mambavision.runtime import check_output_folder
    from mambavision.train import resolve_config, train

    if args.task != 'cls':
        return _run_train_dense(args)
    config = resolve_config(args)
    if args.output:
        check_output_folder(args.output)
    if args.pretrained and not args.pretrained_file:
        _fetch_pretrained(config['model'], '--pretrained-file')
    epochs, cooldown = config['train']['epochs'], config['train']['cooldown_epochs']
    if cooldown and not args.resume and int(os.environ.get('RANK', 0)) == 0:
        print(f'mambavision train: {epochs + cooldown} epochs: --epochs {epochs} of the cosine schedule, then '
              f'{cooldown} cool-down epochs at min_lr (the config\'s cooldown_epochs; --cooldown-epochs 0 trains '
              f'{epochs})', file=sys.stderr)
    return train(args)


_DENSE_DEFAULT_MODEL = {'seg': 'upernet_mambavision_t', 'det': 'cascade_mask_rcnn_mambavision_t'}


def _run_train_dense(args: argparse.Namespace) -> int:
    """``mambavision train --task seg|det``: fine-tune a segmenter or a detector with the published recipe."""
    import os
    import time

    from mambavision.dense.train import train_detector, train_segmenter
    from mambavision.runtime import UserError, check_output_folder
    from mambavision.train import _setup_logging

    if args.config:
        raise UserError(f'--config describes classification training; --task {args.task} takes its options directly')
    if args.task == 'seg' and args.epochs is not None:
        raise UserError('--epochs applies to --task det; --task seg counts --iters')
    if args.task == 'det' and args.iters is not None:
        raise UserError('--iters applies to --task seg; --task det counts --epochs')
    _setup_logging(int(os.environ.get('RANK', 0)))
    model = args.model or _DENSE_DEFAULT_MODEL[args.task]
    output = args.output or os.path.join('output', f'{model.split(".")[0]}-{time.strftime("%Y%m%d-%H%M%S")}')
    check_output_folder(output)
    settings = dict(
        iters=args.iters, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
        warmup_iters=args.warmup_iters, total_batch=args.total_batch, batch_size=args.batch_size,
        amp=args.amp or 'auto', eval_interval=args.eval_interval, clip_grad=args.clip_grad or None, seed=args.seed,
        workers=args.workers, device=args.device, resume=args.resume)
    options = {k: v for k, v in settings.items() if v is not None}
    start = dict(pretrained=args.pretrained_file or bool(args.pretrained), backbone=args.backbone,
                 drop_path_rate=0.2 if args.drop_path is None else args.drop_path, val_dir=args.val_data)
    if args.task == 'seg':
        train_segmenter(args.data_dir, output, model, crop_size=args.crop_size, **start, **options)
    else:
        train_detector(args.data_dir, output, model, **start, **options)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    """``mambavision validate``: a classifier's loss, top-1, top-5, or a segmenter's / detector's metrics."""
    import torch.distributed as dist

    from mambavision.runtime import init_distributed
    from mambavision.train import _setup_logging, validate

    device, rank, world = init_distributed(args.device)
    try:
        _setup_logging(rank)
        if args.task == 'cls':
            if args.pretrained:
                _fetch_pretrained(args.model, '--checkpoint')
            results = validate(args, device, rank)
        else:
            from .dense import validate_dense
            results = validate_dense(args, device)
        if rank == 0:
            text = json.dumps(results, indent=2)
            print(text)
            if args.results_file:
                with open(args.results_file, 'w') as f:
                    f.write(text + '\n')
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
