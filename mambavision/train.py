"""Training and validation built from timm's components and ``torch.distributed``.

``train`` (``mambavision train`` on the command line) runs one process on a CPU or GPU, or one process per GPU under
``torchrun`` (DDP on NCCL, or gloo on CPUs; several nodes through torchrun's rendezvous).
timm supplies the data pipeline (datasets, train/eval transforms, RandAugment,
Mixup/CutMix, label smoothing), the optimizer factory, the cosine schedule with
warm-up, the weight EMA, and the loss scaler.

A run is described by a YAML config (``configs/*.yaml``) whose ``data`` and ``train``
keys (``OPTIONS``) are also command-line options of the same name (``--warmup-epochs`` sets
``train.warmup_epochs``); the command line wins. ``train`` and ``validate`` take the run's
options as an ``argparse.Namespace`` (or any object with the same attributes): the config keys
above plus ``model``, ``config``, ``data_dir``, ``dataset``, ``train_split``/``val_split``, ``img_size``,
``num_classes``, ``amp``, ``device``, ``workers``, ``seed``, ``output``, ``resume``, ``pretrained``,
``pretrained_file``, ``grad_checkpointing``, ``sync_bn`` (validate: ``checkpoint``, ``ema``,
``batch_size``). Per epoch, rank 0 appends one JSON row
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
from dataclasses import dataclass
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

from .runtime import amp_autocast, init_distributed, resolve_device
from .weights import checkpoint_classes, checkpoint_filter_fn, load_pretrained_file, read_checkpoint

__all__ = ['OPTIONS', 'train', 'validate', 'resolve_config', 'load_config', 'load_checkpoint', 'save_checkpoint']

_logger = logging.getLogger(__name__)

# timm's names for resize interpolations (``timm.data.transforms.str_to_interp_mode``)
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')

# Config sections whose keys are also command-line options (default: used when neither config nor CLI sets one).
OPTIONS: Dict[str, Dict[str, Dict[str, Any]]] = {
    'data': {
        'input_size': dict(type=int, nargs=3, metavar=('C', 'H', 'W'), help='model input size'),
        'crop_pct': dict(type=float, help='eval: resize to size / crop_pct, then crop'),
        'crop_mode': dict(choices=['center', 'squash', 'border'], help='eval crop mode'),
        'interpolation': dict(choices=INTERPOLATIONS, help='eval resize interpolation'),
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
        'train_interpolation': dict(default='random', choices=INTERPOLATIONS + ('random',),
                                    help="train resize interpolation ('random': bilinear or bicubic per image)"),
        'model_ema_decay': dict(type=float, default=0., help='decay of the weight EMA (0: no EMA)'),
        'clip_grad': dict(type=float, default=0., help='clip the gradient norm to this (0: no clipping)'),
    },
}
CONFIG_KEYS = ('model', 'architecture', 'weights', 'data', 'train')


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
    unknown += [f'{s}.{k}' for s in OPTIONS if isinstance(config.get(s), dict)
                for k in config[s] if k not in OPTIONS[s]]
    if unknown:
        raise ValueError(f'config {path} has unknown keys: {", ".join(unknown)}')
    for section in (s for s in OPTIONS if isinstance(config.get(s), dict)):
        for key, value in config[section].items():
            choices = OPTIONS[section][key].get('choices')
            if choices and value not in choices:
                raise ValueError(f'config {path}: {section}.{key} is {value!r}; expected one of {", ".join(choices)}')
    return config


def resolve_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's config: command line over ``--config`` over defaults, as a plain dict (safe to checkpoint)."""
    config = load_config(args.config) if getattr(args, 'config', None) else {}
    model = args.model or config.get('model')
    if not model:
        raise ValueError('no model: pass --model NAME or a --config that names one')
    arch = split_model_name_tag(args.model)[0] if args.model else None
    if arch and config.get('model') and arch != split_model_name_tag(config['model'])[0]:
        raise ValueError(f'--model {args.model} contradicts the config, which describes {config["model"]}')
    out = dict(model=model, architecture=dict(config.get('architecture') or {}),
               weights=dict(config.get('weights') or {}))
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
            raise FileNotFoundError(
                f'no {split} folder in {args.data_dir} (expected {args.data_dir}/{split}/<class>/<image>)')
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
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return auto_augment.posterize(img, bits_to_keep, **kwargs)

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
        if overlay.get('file'):  # the file's own class count: another one here fine-tunes a fresh classifier
            overlay['num_classes'] = checkpoint_classes(read_checkpoint(overlay['file']))[0]
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
def evaluate(model, loader, device, amp, rank, desc='val', per_class: bool = False) -> Dict[str, Any]:
    """Loss, top-1 and top-5 (%) over ``loader``, summed over all ranks; with ``per_class`` also
    ``per_class_top1``, each class's top-1 (%, None for a class without samples)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, samples
    class_counts = None  # (2, classes): top-1 hits and samples per class
    for x, y in _progress(loader, rank, desc):
        with amp_autocast(device.type, amp):
            out = model(x)
        top1, top5 = accuracy(out.float(), y, topk=(1, min(5, out.shape[-1])))
        n = len(y)
        totals += torch.stack([
            F.cross_entropy(out.float(), y, reduction='sum'), top1 * n / 100, top5 * n / 100, torch.ones_like(top1) * n,
        ]).double()
        if per_class:
            if class_counts is None:
                class_counts = torch.zeros(2, out.shape[-1], dtype=torch.float64, device=device)
            class_counts[0].index_add_(0, y, (out.argmax(-1) == y).double())
            class_counts[1].index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    totals = _all_sum(totals, device)
    count = max(totals[3].item(), 1)
    metrics: Dict[str, Any] = dict(loss=totals[0].item() / count, top1=100 * totals[1].item() / count,
                                   top5=100 * totals[2].item() / count, samples=int(totals[3].item()))
    if per_class and class_counts is not None:
        hits, samples = _all_sum(class_counts, device).tolist()
        metrics['per_class_top1'] = [100 * h / s if s else None for h, s in zip(hits, samples)]
    return metrics


def train(args: argparse.Namespace) -> int:
    """Train or fine-tune, in one process or in each process of a torchrun launch (see the module docstring)."""
    config = resolve_config(args)
    output = args.output or os.path.join(
        'output', f'{split_model_name_tag(config["model"])[0]}-{time.strftime("%Y%m%d-%H%M%S")}')
    if not args.resume and os.path.exists(os.path.join(output, 'last.pth.tar')):
        raise FileExistsError(f'{output} already holds a run; pass --resume {output}/last.pth.tar or another --output')
    if args.sync_bn and resolve_device(args.device).type != 'cuda':
        raise ValueError('--sync-bn needs CUDA GPUs')
    device, rank, world = init_distributed(args.device)
    try:
        _setup_logging(rank)
        # a wrong --resume file fails before any data is read
        checkpoint = _training_checkpoint(args.resume, config['model']) if args.resume else None
        run = _build_run(args, config, device)
        start_epoch, best_top1 = _resume(run, checkpoint, args.resume) if checkpoint else (0, -1.)
        _train_epochs(run, args, output, start_epoch, best_top1, rank, world)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """What a training run is made of, built once before the first epoch."""
    config: Dict[str, Any]
    model: nn.Module
    optimizer: Any
    scheduler: Any
    num_epochs: int
    scaler: Optional[NativeScaler]
    ema: Optional[ModelEmaV3]
    loss_fn: nn.Module
    train_loader: Any
    val_loader: Any
    device: torch.device


def _build_run(args, config, device) -> _Run:
    """Data, model, optimizer, schedule, loss scaler, EMA and loss of a run; ``config`` gains the class names."""
    train_cfg = config['train']
    random_seed(args.seed, dist.get_rank() if dist.is_initialized() else 0)
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
    optimizer = create_optimizer_v2(
        model, opt=train_cfg['opt'], lr=train_cfg['lr'], weight_decay=train_cfg['weight_decay'])
    scaler = NativeScaler(device=device.type) if args.amp == 'fp16' else None
    ema = ModelEmaV3(model, decay=train_cfg['model_ema_decay']) if train_cfg['model_ema_decay'] else None

    mixup_active = train_cfg['mixup'] > 0 or train_cfg['cutmix'] > 0
    if mixup_active and train_cfg['batch_size'] % 2:
        raise ValueError(f'mixup/cutmix pair the images of a batch: --batch-size must be even, '
                         f'got {train_cfg["batch_size"]}')
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
    loss_fn: nn.Module
    if mixup_active:
        loss_fn = SoftTargetCrossEntropy()
    elif train_cfg['smoothing']:
        loss_fn = LabelSmoothingCrossEntropy(train_cfg['smoothing'])
    else:
        loss_fn = nn.CrossEntropyLoss()
    return _Run(config, model, optimizer, scheduler, num_epochs, scaler, ema, loss_fn, train_loader, val_loader,
                device)


def _training_checkpoint(path: str, model_name: str) -> Dict[str, Any]:
    checkpoint = load_checkpoint(path, model_name)
    if not all(k in checkpoint for k in ('epoch', 'optimizer', 'scheduler', 'state_dict')):
        raise ValueError(f'{path} is not a training checkpoint of ours (no optimizer state); '
                         f'use --pretrained --pretrained-file to start from its weights')
    return checkpoint


def _resume(run: _Run, ckpt: Dict[str, Any], path: str) -> Tuple[int, float]:
    """Restore weights, optimizer, scaler and EMA from ``ckpt`` (read from ``path``): (first epoch, best top-1)."""
    run.model.load_state_dict(ckpt['state_dict'])
    run.optimizer.load_state_dict(ckpt['optimizer'])
    if ckpt['scheduler'] != run.scheduler.state_dict():  # the schedule follows the command line
        _logger.warning(f'the schedule differs from the one {path} was trained with (epochs, lr, warm-up '
                        f'or updates per epoch changed): following this command')
    if run.scaler is not None and ckpt.get('scaler'):
        run.scaler.load_state_dict(ckpt['scaler'])
    if run.ema is not None and ckpt.get('state_dict_ema'):
        run.ema.module.load_state_dict(ckpt['state_dict_ema'])
    start_epoch = ckpt['epoch'] + 1
    _logger.info(f'resumed from {path}: epoch {ckpt["epoch"]} done, continuing at epoch {start_epoch}')
    return start_epoch, ckpt.get('best_top1', -1.)


def _train_epochs(run: _Run, args, output: str, start_epoch: int, best_top1: float, rank: int, world: int):
    """The epochs ``start_epoch``.. of the schedule: train, evaluate, log, save."""
    config, train_cfg, device = run.config, run.config['train'], run.device
    num_updates = start_epoch * len(run.train_loader)
    run.scheduler.step_update(num_updates)
    model = run.model
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if rank == 0:
        os.makedirs(output, exist_ok=True)
        _logger.info(f'training {config["model"]} on {world} process(es) ({device.type}), '
                     f'{len(run.train_loader.dataset)} images, {config["num_classes"]} classes, '
                     f'epochs {start_epoch}..{run.num_epochs - 1}, output {output}')
    for epoch in range(start_epoch, run.num_epochs):
        if hasattr(run.train_loader.sampler, 'set_epoch'):
            run.train_loader.sampler.set_epoch(epoch)
        lr = run.optimizer.param_groups[0]['lr']
        stats, num_updates = train_one_epoch(
            epoch, model, run.train_loader, run.optimizer, run.loss_fn, run.scheduler, run.ema, run.scaler,
            train_cfg['clip_grad'], args.amp, device, rank, num_updates)
        per_rank = torch.zeros(world)
        per_rank[rank] = stats['samples']
        loss_sum, per_rank = _all_sum([stats['loss_sum']], device).item(), _all_sum(per_rank, device)
        train_loss = loss_sum / per_rank.sum().item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f'training loss is {train_loss} in epoch {epoch}; try a lower --lr or --amp bf16')
        metrics = evaluate(model, run.val_loader, device, args.amp, rank)
        row = dict(
            epoch=epoch, train_loss=train_loss, val_loss=metrics['loss'], top1=metrics['top1'], top5=metrics['top5'],
            lr=lr, images_per_s=per_rank.sum().item() / stats['seconds'], world_size=world,
            samples_per_rank=[int(n) for n in per_rank.tolist()])
        if run.ema is not None:
            ema_metrics = evaluate(run.ema.module, run.val_loader, device, args.amp, rank, desc='val ema')
            row.update(ema_top1=ema_metrics['top1'], ema_top5=ema_metrics['top5'], ema_val_loss=ema_metrics['loss'])
        run.scheduler.step(epoch + 1)
        if rank == 0:
            is_best = row['top1'] > best_top1
            best_top1 = max(best_top1, row['top1'])
            _save(run, output, epoch, row, best_top1, is_best)


def _save(run: _Run, output: str, epoch: int, row: Dict[str, Any], best_top1: float, is_best: bool):
    """``last.pth.tar`` (and ``best.pth.tar`` on a new best top-1) and a row of ``metrics.jsonl`` in ``output``."""
    state = dict(
        arch=run.config['model'], epoch=epoch, state_dict=run.model.state_dict(),
        state_dict_ema=run.ema.module.state_dict() if run.ema is not None else None,
        optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler is not None else None,
        config=run.config, metrics=row, best_top1=best_top1)
    save_checkpoint(state, os.path.join(output, 'last.pth.tar'))
    if is_best:
        save_checkpoint(state, os.path.join(output, 'best.pth.tar'))
    with open(os.path.join(output, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')
    _logger.info(
        f'epoch {epoch}: train loss {row["train_loss"]:.4f}, val loss {row["val_loss"]:.4f}, '
        f'top-1 {row["top1"]:.2f}, top-5 {row["top5"]:.2f}, lr {row["lr"]:.3g}, {row["images_per_s"]:.1f} img/s')


# ---------------------------------------------------------------------------------------------------------------------
# validate

def validate(args: argparse.Namespace, device: torch.device, rank: int = 0) -> Dict[str, Any]:
    """Loss, top-1 and top-5 of a checkpoint (``args.checkpoint``) or the published weights with the model's own
    eval preprocessing, on the validation split (summed over the ranks of a torchrun launch)."""
    config = resolve_config(args)
    ds = _dataset(args, args.val_split, is_training=False)
    names = None  # the class names a checkpoint of ours was trained on
    if args.pretrained:
        model = timm.create_model(
            args.model, pretrained=True, **({'num_classes': args.num_classes} if args.num_classes else {}))
    else:
        checkpoint = load_checkpoint(args.checkpoint, args.model)
        if args.ema and not checkpoint.get('state_dict_ema'):
            raise ValueError(f'--ema: {args.checkpoint} holds no EMA weights')
        state_dict = checkpoint_filter_fn(checkpoint['state_dict_ema'] if args.ema else checkpoint)
        num_classes, names = checkpoint_classes(checkpoint)
        if args.num_classes and args.num_classes != num_classes:
            raise ValueError(
                f'--num-classes {args.num_classes}: {args.checkpoint} has a {num_classes}-class classifier')
        model = timm.create_model(args.model, num_classes=num_classes)
        if args.ema:
            model.load_state_dict(state_dict)
        else:
            load_pretrained_file(model, args.checkpoint)
    classes = _class_names(ds)
    if classes and len(classes) != model.num_classes:
        raise ValueError(f'{args.data_dir} has {len(classes)} class folders in {args.val_split}, '
                         f'the model {model.num_classes} classes')
    if classes and names and names[:len(classes)] != classes:
        first = next(i for i, (a, b) in enumerate(zip(classes, names)) if a != b)
        raise ValueError(f'{args.data_dir}: class {first} is {classes[first]!r} in {args.val_split}, '
                         f'{names[first]!r} in {args.checkpoint}: the folders must be the classes it was trained on')
    data_config = resolve_data_config({k: v for k, v in config['data'].items() if v is not None}, model=model)
    loader = _loader(ds, data_config, args.batch_size, False, args, device)
    model.to(device)
    metrics = evaluate(model, loader, device, args.amp, rank, per_class=getattr(args, 'per_class', False))
    results = dict(model=args.model, checkpoint=args.checkpoint or 'pretrained', ema=args.ema,
                   top1=metrics['top1'], top5=metrics['top5'], loss=metrics['loss'], samples=metrics['samples'],
                   input_size=list(data_config['input_size']), crop_pct=data_config['crop_pct'],
                   crop_mode=data_config['crop_mode'], interpolation=data_config['interpolation'])
    if 'per_class_top1' in metrics:
        names = classes or model.pretrained_cfg.get('label_names') or []
        results['per_class'] = {(str(names[i]) if i < len(names) else f'class {i}'): top1
                                for i, top1 in enumerate(metrics['per_class_top1'])}
    return results
