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
