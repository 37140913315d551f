"""Training and validation built from timm's components and ``torch.distributed``.

``mambavision train`` runs one process on a CPU or GPU, or one process per GPU under
``torchrun`` (DDP on NCCL, or gloo on CPUs; several nodes through torchrun's rendezvous).
timm supplies the data pipeline (datasets, train/eval transforms, RandAugment,
Mixup/CutMix, label smoothing), the optimizer factory, the cosine schedule with
warm-up, the weight EMA, and the loss scaler.

A run is described by a YAML config (``configs/*.yaml``) whose ``data`` and ``train``
keys are also command-line options of the same name (``--warmup-epochs`` sets
``train.warmup_epochs``); the command line wins. Per epoch, rank 0 appends one JSON row
to ``OUT/metrics.jsonl`` and writes ``OUT/last.pth.tar`` (and ``OUT/best.pth.tar`` on a new
best validation top-1) atomically. A checkpoint holds the raw weights (``state_dict``),
the EMA weights (``state_dict_ema``), optimizer, scheduler and loss-scaler state, the
epoch and the resolved config, all loadable with ``torch.load(weights_only=True)``. ``--resume``
restores them and continues with the next epoch; the lr schedule is rebuilt from the command
line and compared with the saved scheduler state (a warning says when they differ).

Unreadable images are skipped with a warning that names the file.
"""
import argparse
import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

import timm
from timm.data import FastCollateMixup, ImageDataset, create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import split_model_name_tag
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, accuracy, dispatch_clip_grad, random_seed

from .cli import amp_autocast
from .weights import checkpoint_filter_fn, load_pretrained_file, read_checkpoint

__all__ = [
    'add_arguments_train', 'run_train', 'add_arguments_validate', 'run_validate', 'resolve_config',
    'load_checkpoint', 'save_checkpoint',
]

_logger = logging.getLogger(__name__)

# Config sections whose keys are also command-line options (default: used when neither config nor CLI sets one).
OPTIONS = {
    'data': {
        'input_size': dict(type=int, nargs=3, metavar=('C', 'H', 'W'), help='model input size'),
        'crop_pct': dict(type=float, help='eval: resize to size / crop_pct, then crop'),
        'crop_mode': dict(choices=['center', 'squash', 'border'], help='eval crop mode'),
        'interpolation': dict(help='eval resize interpolation'),
        'mean': dict(type=float, nargs='+', help='normalisation mean per channel'),
        'std': dict(type=float, nargs='+', help='normalisation std per channel'),
    },
    'train': {
        'opt': dict(default='adamw', help="timm optimizer ('lamb', 'adamw', 'sgd', ...)"),
        'lr': dict(type=float, default=5e-4, help='peak learning rate (not rescaled by batch size)'),
        'weight_decay': dict(type=float, default=0.05, help='weight decay (none on norms, biases, A_log, D)'),
        'epochs': dict(type=int, default=30, help='epochs of the cosine schedule'),
        'warmup_epochs': dict(type=int, default=1, help='epochs of linear warm-up'),
        'warmup_lr': dict(type=float, default=1e-6, help='learning rate at the start of warm-up'),
        'min_lr': dict(type=float, default=1e-6, help='learning rate at the end of the cosine'),
        'cooldown_epochs': dict(type=int, default=0, help='epochs at min_lr after the schedule'),
        'batch_size': dict(type=int, default=64, help='images per process and step'),
        'drop_path': dict(type=float, help="stochastic depth rate (default: the model's own)"),
        'smoothing': dict(type=float, default=0.1, help='label smoothing'),
        'mixup': dict(type=float, default=0., help='mixup alpha (0: off)'),
        'cutmix': dict(type=float, default=0., help='cutmix alpha (0: off)'),
        'aa': dict(help="timm RandAugment spec, e.g. 'rand-m9-mstd0.5-inc1' ('none': off)"),
        'reprob': dict(type=float, default=0., help='random erasing probability'),
        'color_jitter': dict(type=float, default=0.4, help='colour jitter strength'),
        'train_interpolation': dict(default='random', help='train resize interpolation'),
        'model_ema_decay': dict(type=float, default=0., help='decay of the weight EMA (0: no EMA)'),
        'clip_grad': dict(type=float, default=0., help='clip the gradient norm to this (0: no clipping)'),
    },
}
CONFIG_KEYS = ('model', 'architecture', 'weights', 'data', 'train')


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
    parser.add_argument('--data-dir', required=True, help='dataset root (ImageFolder: DIR/train/<class>/*, DIR/val/<class>/*); '
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
    _add_config_options(parser, ('data',))


# ---------------------------------------------------------------------------------------------------------------------
# config

def load_config(path: str) -> Dict[str, Any]:
    """A YAML config as a plain dict, its sections and keys checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict):
        raise ValueError(f'config {path} must be a mapping with sections {", ".join(CONFIG_KEYS)}')
    unknown = [k for k in config if k not in CONFIG_KEYS]
    unknown += [f'{s}.{k}' for s in OPTIONS if isinstance(config.get(s), dict) for k in config[s] if k not in OPTIONS[s]]
    if unknown:
        raise ValueError(f'config {path} has unknown keys: {", ".join(unknown)}')
    return config


def resolve_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's config: command line over ``--config`` over defaults, as a plain dict (safe to checkpoint)."""
    config = load_config(args.config) if getattr(args, 'config', None) else {}
    model = args.model or config.get('model')
    if not model:
        raise ValueError('no model: pass --model NAME or a --config that names one')
    if args.model and config.get('model') and split_model_name_tag(args.model)[0] != split_model_name_tag(config['model'])[0]:
        raise ValueError(f'--model {args.model} contradicts the config, which describes {config["model"]}')
    out = dict(model=model, architecture=dict(config.get('architecture') or {}), weights=dict(config.get('weights') or {}))
    for section, options in OPTIONS.items():
        if not hasattr(args, next(iter(options))):
            continue
        given = config.get(section) or {}
        out[section] = {}
        for key, spec in options.items():
            value = getattr(args, key)
            value = value if value is not None else given.get(key, spec.get('default'))
            out[section][key] = list(value) if isinstance(value, (list, tuple)) else value
    if args.img_size:
        out['data']['input_size'] = [3, args.img_size, args.img_size]
    if 'train' in out and str(out['train']['aa']).lower() in ('', 'none'):
        out['train']['aa'] = None
    return out


# ---------------------------------------------------------------------------------------------------------------------
# distributed

def _init_distributed(device: Optional[str]) -> Tuple[torch.device, int, int]:
    """Join the torchrun process group if there is one: (device, rank, world size)."""
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if device.startswith('cuda'):
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
        return torch.device(device), dist.get_rank(), dist.get_world_size()
    return torch.device(device), 0, 1


def _all_sum(values, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def _setup_logging(rank: int):
    if not logging.getLogger().handlers:
        logging.basicConfig(format='%(message)s')
    logging.getLogger('mambavision').setLevel(logging.INFO if rank == 0 else logging.WARNING)


# ---------------------------------------------------------------------------------------------------------------------
# data

class SkippingImageDataset(ImageDataset):
    """timm's ``ImageDataset`` whose warning for an unreadable image names the file; the next image is used instead."""

    max_skips = 50

    def __getitem__(self, index: int):
        for _ in range(self.max_skips):
            try:
                f, target = self.reader[index][:2]
                img = Image.open(f).convert(self.input_img_mode)
                break
            except OSError as e:
                _logger.warning(f'skipped unreadable image {self.filename(index, absolute=True)}: {e}')
                index = (index + 1) % len(self)
        else:
            raise RuntimeError(f'{self.max_skips} unreadable images in a row in {self.reader.root}')
        return (self.transform(img) if self.transform is not None else img), target


def _dataset(args, split: str, is_training: bool):
    if args.dataset == '':
        if not os.path.isdir(args.data_dir):
            raise FileNotFoundError(f'data folder not found: {args.data_dir}')
        ds = create_dataset('', root=args.data_dir, split=split, is_training=is_training)
        if os.path.samefile(ds.reader.root, args.data_dir) and (
                is_training or os.path.isdir(os.path.join(args.data_dir, 'train'))):
            raise FileNotFoundError(f'no {split} folder in {args.data_dir} (expected {args.data_dir}/{split}/<class>/<image>)')
        # validation also takes a folder whose sub-folders are the classes (no split folder)
        return SkippingImageDataset(ds.reader.root, reader=ds.reader)
    return create_dataset(args.dataset, root=args.data_dir, split=split, is_training=is_training)


def _class_names(ds) -> Optional[list]:
    reader = getattr(ds, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None)
    return sorted(class_to_idx, key=class_to_idx.get) if class_to_idx else None


def _check_classes(train_ds, val_ds, val_split: str):
    train, val = _class_names(train_ds), _class_names(val_ds)
    if train is None or val is None or train == val:
        return
    missing = [c for c in train if c not in val]
    extra = [c for c in val if c not in train]
    parts = [f'{what}: {", ".join(names[:5])}{" ..." if len(names) > 5 else ""}'
             for what, names in (('missing from it', missing), ('not in train', extra)) if names]
    raise ValueError(f'the {val_split} split must have the same class folders as train; ' + '; '.join(parts))


def _posterize_zero_bits():
    """Let timm's posterize ops keep 0 bits (a black image) again, which Pillow >= 13 refuses.

    timm's RandAugment asks for 0 bits at the top magnitude ('inc1' ops at level 10, so
    'rand-m9-mstd0.5-inc1' now and then); Pillow < 13 returned a black image there.
    """
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **kwargs):
        return Image.new(img.mode, img.size) if bits_to_keep <= 0 else auto_augment.posterize(img, bits_to_keep, **kwargs)

    for name, op in auto_augment.NAME_TO_OP.items():
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize


def _loader(ds, data_config, batch_size, is_training, args, device, train_cfg=None, collate_fn=None):
    kwargs = dict(
        input_size=data_config['input_size'], batch_size=batch_size, is_training=is_training,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'], num_workers=args.workers,
        distributed=dist.is_initialized(), device=device, collate_fn=collate_fn, pin_memory=device.type == 'cuda')
    if is_training:
        if train_cfg['aa']:
            _posterize_zero_bits()
        kwargs.update(
            auto_augment=train_cfg['aa'], re_prob=train_cfg['reprob'], color_jitter=train_cfg['color_jitter'],
            interpolation=train_cfg['train_interpolation'])
    return create_loader(ds, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(state: Dict[str, Any], path: str):
    """``torch.save`` to a temporary file, flushed to disk, then renamed over ``path`` (never a partial file)."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, model_name: Optional[str] = None) -> Dict[str, Any]:
    """A checkpoint read without running code; if it is one of ours, it must be of ``model_name``'s architecture."""
    checkpoint = read_checkpoint(path)
    config = checkpoint.get('config')
    arch = config.get('model') if isinstance(config, dict) else None  # published ones name their own classes
    if model_name and arch and split_model_name_tag(arch)[0] != split_model_name_tag(model_name)[0]:
        raise ValueError(f'checkpoint {path} was written for model {arch}, not {model_name}')
    return checkpoint


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------------------------------
# train

def _build_model(config: Dict[str, Any], num_classes: int, pretrained: bool, pretrained_file: Optional[str]):
    kwargs = dict(config['architecture'], num_classes=num_classes)
    if config['train']['drop_path'] is not None:
        kwargs['drop_path_rate'] = config['train']['drop_path']
    if pretrained:
        overlay = {k: v for k, v in config['weights'].items() if k != 'num_classes'}
        if pretrained_file:
            overlay['file'] = pretrained_file
        kwargs['pretrained_cfg_overlay'] = overlay
    return timm.create_model(config['model'], pretrained=pretrained, **kwargs)


def _progress(iterable, rank: int, desc: str):
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=rank != 0, dynamic_ncols=True, leave=False)


def train_one_epoch(
        epoch, model, loader, optimizer, loss_fn, scheduler, ema, scaler, clip_grad, amp, device, rank,
        num_updates) -> Tuple[Dict[str, float], int]:
    """One pass over ``loader``: ({'loss_sum', 'samples', 'seconds'} of this rank, updates so far)."""
    model.train()
    loss_sum, samples = torch.zeros((), dtype=torch.float64, device=device), 0
    start = time.perf_counter()
    bar = _progress(loader, rank, f'train {epoch}')
    for step, (x, y) in enumerate(bar):
        with amp_autocast(device.type, amp):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler(loss, optimizer, clip_grad=clip_grad or None, parameters=model.parameters())
        else:
            loss.backward()
            if clip_grad:
                dispatch_clip_grad(model.parameters(), clip_grad)
            optimizer.step()
        num_updates += 1
        if ema is not None:
            ema.update(_unwrap(model), step=num_updates)
        scheduler.step_update(num_updates)
        loss_sum += loss.detach().double() * len(x)
        samples += len(x)
        if rank == 0 and step % 10 == 0:
            bar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
    return dict(loss_sum=loss_sum.item(), samples=samples, seconds=time.perf_counter() - start), num_updates


@torch.no_grad()
def evaluate(model, loader, device, amp, rank, desc='val') -> Dict[str, float]:
    """Loss, top-1 and top-5 (%) over ``loader``, summed over all ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, samples
    for x, y in _progress(loader, rank, desc):
        with amp_autocast(device.type, amp):
            out = model(x)
        top1, top5 = accuracy(out.float(), y, topk=(1, min(5, out.shape[-1])))
        n = len(y)
        totals += torch.stack([
            F.cross_entropy(out.float(), y, reduction='sum'), top1 * n / 100, top5 * n / 100, torch.ones_like(top1) * n,
        ]).double()
    totals = _all_sum(totals, device)
    n = max(totals[3].item(), 1)
    return dict(loss=totals[0].item() / n, top1=100 * totals[1].item() / n, top5=100 * totals[2].item() / n,
                samples=int(totals[3].item()))


def run_train(args: argparse.Namespace) -> int:
    """``mambavision train``: train or fine-tune, single-process or under torchrun."""
    config = resolve_config(args)
    train_cfg = config['train']
    output = args.output or os.path.join('output', f'{split_model_name_tag(config["model"])[0]}-{time.strftime("%Y%m%d-%H%M%S")}')
    if not args.resume and os.path.exists(os.path.join(output, 'last.pth.tar')):
        raise FileExistsError(f'{output} already holds a run; pass --resume {output}/last.pth.tar or another --output')
    if args.sync_bn and not (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda'):
        raise ValueError('--sync-bn needs CUDA GPUs')
    device, rank, world = _init_distributed(args.device)
    try:
        _setup_logging(rank)
        return _train(args, config, train_cfg, output, device, rank, world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(args, config, train_cfg, output, device, rank, world) -> int:
    ckpt = load_checkpoint(args.resume, config['model']) if args.resume else None
    if ckpt is not None and not all(k in ckpt for k in ('epoch', 'optimizer', 'scheduler', 'state_dict')):
        raise ValueError(f'{args.resume} is not a training checkpoint of ours (no optimizer state); '
                         f'use --pretrained --pretrained-file to start from its weights')
    random_seed(args.seed, rank)
    train_ds = _dataset(args, args.train_split, is_training=True)
    val_ds = _dataset(args, args.val_split, is_training=False)
    _check_classes(train_ds, val_ds, args.val_split)
    classes = _class_names(train_ds)
    num_classes = args.num_classes or (len(classes) if classes else None)
    if num_classes is None:
        raise ValueError(f'cannot tell the number of classes of dataset {args.dataset!r}: pass --num-classes')
    if classes and num_classes < len(classes):
        raise ValueError(f'--num-classes {num_classes} is less than the {len(classes)} classes in {args.data_dir}')
    config['num_classes'] = num_classes
    config['classes'] = classes

    model = _build_model(config, num_classes, args.pretrained, args.pretrained_file)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    data_config = resolve_data_config({k: v for k, v in config['data'].items() if v is not None}, model=model)
    config['data'] = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
    model.to(device)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = create_optimizer_v2(model, opt=train_cfg['opt'], lr=train_cfg['lr'], weight_decay=train_cfg['weight_decay'])
    scaler = NativeScaler(device=device.type) if args.amp == 'fp16' else None
    ema = ModelEmaV3(model, decay=train_cfg['model_ema_decay']) if train_cfg['model_ema_decay'] else None

    mixup_active = train_cfg['mixup'] > 0 or train_cfg['cutmix'] > 0
    if mixup_active and train_cfg['batch_size'] % 2:
        raise ValueError(f'mixup/cutmix pair the images of a batch: --batch-size must be even, got {train_cfg["batch_size"]}')
    collate = FastCollateMixup(
        mixup_alpha=train_cfg['mixup'], cutmix_alpha=train_cfg['cutmix'], label_smoothing=train_cfg['smoothing'],
        num_classes=num_classes) if mixup_active else None
    train_loader = _loader(train_ds, data_config, train_cfg['batch_size'], True, args, device, train_cfg, collate)
    val_loader = _loader(val_ds, data_config, train_cfg['batch_size'], False, args, device)
    if len(train_loader) == 0:
        raise ValueError(f'{len(train_ds)} training images make no full batch of {train_cfg["batch_size"]} per rank')
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched='cosine', num_epochs=train_cfg['epochs'], warmup_epochs=train_cfg['warmup_epochs'],
        warmup_lr=train_cfg['warmup_lr'], min_lr=train_cfg['min_lr'], cooldown_epochs=train_cfg['cooldown_epochs'],
        step_on_epochs=False, updates_per_epoch=len(train_loader))

    start_epoch, best_top1 = 0, -1.
    if ckpt is not None:
        _unwrap(model).load_state_dict(ckpt['state_dict'])
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt['scheduler'] != scheduler.state_dict():  # the schedule follows the command line
            _logger.warning(f'the schedule differs from the one {args.resume} was trained with (epochs, lr, warm-up '
                            f'or updates per epoch changed): following this command')
        if scaler is not None and ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        if ema is not None and ckpt.get('state_dict_ema'):
            ema.module.load_state_dict(ckpt['state_dict_ema'])
        start_epoch, best_top1 = ckpt['epoch'] + 1, ckpt.get('best_top1', -1.)
        _logger.info(f'resumed from {args.resume}: epoch {ckpt["epoch"]} done, continuing at epoch {start_epoch}')
    num_updates = start_epoch * len(train_loader)
    scheduler.step_update(num_updates)

    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if mixup_active:
        train_loss_fn = SoftTargetCrossEntropy()
    elif train_cfg['smoothing']:
        train_loss_fn = LabelSmoothingCrossEntropy(train_cfg['smoothing'])
    else:
        train_loss_fn = nn.CrossEntropyLoss()
    if rank == 0:
        os.makedirs(output, exist_ok=True)
        _logger.info(f'training {config["model"]} on {world} process(es) ({device.type}), {len(train_ds)} images, '
                     f'{num_classes} classes, epochs {start_epoch}..{num_epochs - 1}, output {output}')

    for epoch in range(start_epoch, num_epochs):
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]['lr']
        stats, num_updates = train_one_epoch(
            epoch, model, train_loader, optimizer, train_loss_fn, scheduler, ema, scaler, train_cfg['clip_grad'],
            args.amp, device, rank, num_updates)
        per_rank = torch.zeros(world)
        per_rank[rank] = stats['samples']
        loss_sum, per_rank = _all_sum([stats['loss_sum']], device).item(), _all_sum(per_rank, device)
        train_loss = loss_sum / per_rank.sum().item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f'training loss is {train_loss} in epoch {epoch}; try a lower --lr or --amp bf16')
        metrics = evaluate(model, val_loader, device, args.amp, rank)
        row = dict(
            epoch=epoch, train_loss=train_loss, val_loss=metrics['loss'], top1=metrics['top1'], top5=metrics['top5'],
            lr=lr, images_per_s=per_rank.sum().item() / stats['seconds'], world_size=world,
            samples_per_rank=[int(n) for n in per_rank.tolist()])
        if ema is not None:
            ema_metrics = evaluate(ema.module, val_loader, device, args.amp, rank, desc='val ema')
            row.update(ema_top1=ema_metrics['top1'], ema_top5=ema_metrics['top5'], ema_val_loss=ema_metrics['loss'])
        scheduler.step(epoch + 1)
        if rank == 0:
            is_best = row['top1'] > best_top1
            best_top1 = max(best_top1, row['top1'])
            state = dict(
                arch=config['model'], epoch=epoch, state_dict=_unwrap(model).state_dict(),
                state_dict_ema=ema.module.state_dict() if ema is not None else None,
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None,
                config=config, metrics=row, best_top1=best_top1)
            save_checkpoint(state, os.path.join(output, 'last.pth.tar'))
            if is_best:
                save_checkpoint(state, os.path.join(output, 'best.pth.tar'))
            with open(os.path.join(output, 'metrics.jsonl'), 'a') as f:
                f.write(json.dumps(row) + '\n')
            _logger.info(
                f'epoch {epoch}: train loss {train_loss:.4f}, val loss {row["val_loss"]:.4f}, top-1 {row["top1"]:.2f}, '
                f'top-5 {row["top5"]:.2f}, lr {lr:.3g}, {row["images_per_s"]:.1f} img/s')
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# validate

def run_validate(args: argparse.Namespace) -> int:
    """``mambavision validate``: loss, top-1, top-5 with the model's own eval preprocessing."""
    device, rank, world = _init_distributed(args.device)
    try:
        _setup_logging(rank)
        if args.task == 'cls':
            results = _validate(args, device, rank)
        else:
            from .dense.cli import validate_dense
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


def _validate(args, device, rank) -> Dict[str, Any]:
    config = resolve_config(args)
    ds = _dataset(args, args.val_split, is_training=False)
    if args.pretrained:
        model = timm.create_model(args.model, pretrained=True, **({'num_classes': args.num_classes} if args.num_classes else {}))
    else:
        checkpoint = load_checkpoint(args.checkpoint, args.model)
        if args.ema and not checkpoint.get('state_dict_ema'):
            raise ValueError(f'--ema: {args.checkpoint} holds no EMA weights')
        state_dict = checkpoint_filter_fn(checkpoint['state_dict_ema'] if args.ema else checkpoint)
        head = state_dict.get('head.fc.weight')
        num_classes = args.num_classes or (head.shape[0] if head is not None else 0)
        model = timm.create_model(args.model, num_classes=num_classes)
        if args.ema:
            model.load_state_dict(state_dict)
        else:
            load_pretrained_file(model, args.checkpoint)
    classes = _class_names(ds)
    if classes and len(classes) != model.num_classes:
        raise ValueError(f'{args.data_dir} has {len(classes)} class folders in {args.val_split}, the model {model.num_classes} classes')
    data_config = resolve_data_config({k: v for k, v in config['data'].items() if v is not None}, model=model)
    loader = _loader(ds, data_config, args.batch_size, False, args, device)
    model.to(device)
    metrics = evaluate(model, loader, device, args.amp, rank)
    return dict(model=args.model, checkpoint=args.checkpoint or 'pretrained', ema=args.ema,
                top1=metrics['top1'], top5=metrics['top5'], loss=metrics['loss'], samples=metrics['samples'],
                input_size=list(data_config['input_size']), crop_pct=data_config['crop_pct'],
                crop_mode=data_config['crop_mode'], interpolation=data_config['interpolation'])
