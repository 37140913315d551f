"""The dense training engine: fine-tuning a segmenter (UPerNet) or a detector (Cascade Mask R-CNN) with the
published recipes, on one CPU or GPU, or one process per GPU under ``torchrun``.

One loop counts iterations; the learning rate is a function of the iteration, replaying mmengine's
chained schedulers exactly (segmentation: LinearLR warm-up from 1e-6 x lr over 1500 iterations, then
PolyLR power 1 to 0 at the last; detection: LinearLR from 0.001 x lr over 1000 iterations, x0.1 at
epochs 27 and 33 of 36, moved proportionally for another epoch count). Each step sees 16 images
(``total_batch``) = images per process x processes x gradient-accumulation steps.

The data order is a function of the seed alone: the training set is read as an endless stream of
per-epoch permutations, step ``s`` takes stream positions ``16 s .. 16 s + 15``, and each rank takes
its share of each micro-batch; the dataset seeds each sample's augmentation from (seed, epoch, index),
the epoch being the stream's. So the images a step sees do not depend on the number of workers or
processes, and a resumed run picks up where the stream stopped. Dropout and drop path draw from a
torch seed made of ``(seed, iteration, rank)``. An interrupted and resumed run therefore equals an
uninterrupted one, bit for bit.

Outputs in ``output``: ``last.pth`` (weights, optimiser, scaler, iteration), ``best.pth`` (the
weights with the best validation mIoU / box AP), ``config.json`` (the run's settings),
``metrics.jsonl`` (training and validation rows) and TensorBoard events when ``tensorboard`` is
installed. Both checkpoints are mmengine-style dicts (``state_dict`` and ``meta.dataset_meta`` with the
class names and palette) readable with ``torch.load(weights_only=True)``, so ``create_segmenter`` /
``create_detector`` (``checkpoint_path=...``) and the weights reader load them.
"""
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..runtime import amp_autocast, init_distributed
from ..train import save_checkpoint  # atomic: a temporary file, flushed, renamed over the path

__all__ = [
    'DenseTrainConfig', 'train_dense', 'recipe', 'poly_schedule', 'step_schedule', 'optimizer_param_groups',
    'SyncBatchNorm2d', 'convert_sync_batchnorm', 'StreamSampler', 'train_sampler', 'EpochKeyed',
    'evaluate_segmentation', 'evaluate_detection', 'train_segmenter', 'train_detector',
]

_logger = logging.getLogger(__name__)

# The published recipes (SPEC "Dense training"): lr and weight decay per variant, the rest per task.
_LR = {'seg': {'t': 5e-5, 's': 6e-5, 'b': 5e-5, 'l3': 8e-5}, 'det': {'t': 1e-4, 's': 1e-4, 'b': 2e-4}}
_WEIGHT_DECAY = {'seg': {'l3': 0.05}, 'det': {}}
_TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    'seg': dict(weight_decay=0.01, iters=160_000, warmup_iters=1500, warmup_factor=1e-6, batch_size=2,
                eval_interval=16_000),
    'det': dict(weight_decay=0.05, epochs=36, warmup_iters=1000, warmup_factor=1e-3, batch_size=2,
                eval_interval=1, milestones=(27, 33)),
}
_BEST_METRIC = {'seg': 'mIoU', 'det': 'bbox_AP'}


def _variant(model_name: str) -> Optional[str]:
    """'upernet_mambavision_l3.nv_...' -> 'l3' (None when the name names no MambaVision variant)."""
    base = model_name.split('.')[0]
    if 'mambavision_' not in base:
        return None
    return base.split('mambavision_', 1)[1].split('_')[0]


def recipe(task: str, model_name: str = '') -> Dict[str, Any]:
    """The published training settings of ``task`` ('seg' or 'det') for the variant named in ``model_name``:
    lr, weight_decay, iters or epochs, warm-up, and the per-process batch size and evaluation interval."""
    if task not in _TASK_DEFAULTS:
        raise ValueError(f"task must be 'seg' or 'det', got {task!r}")
    variant = _variant(model_name) or ''  # '': no variant, the defaults
    out = dict(_TASK_DEFAULTS[task])
    out['lr'] = _LR[task].get(variant, _LR[task]['t'])
    out['weight_decay'] = _WEIGHT_DECAY[task].get(variant, out['weight_decay'])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# learning-rate schedules: mmengine's chained LinearLR / PolyLR / MultiStepLR, replayed per iteration


def _linear_factor(step: int, warmup_iters: int, start_factor: float) -> float:
    """mmengine LinearLR's chained factor at its ``step`` (>= 1), end factor 1."""
    total = warmup_iters - 1
    return 1. + (1. - start_factor) / (total * start_factor + (step - 1) * (1. - start_factor))


def poly_schedule(base_lr: float, iters: int, warmup_iters: int = 1500, warmup_factor: float = 1e-6,
                  power: float = 1., eta_min: float = 0.) -> List[float]:
    """The lr of each of ``iters`` iterations under mmseg's schedule: ``LinearLR(start_factor=warmup_factor,
    begin=0, end=warmup_iters)`` then ``PolyLR(power, eta_min, begin=warmup_iters, end=iters)``, both by
    iteration, computed with mmengine's chained (recursive) formulas in the same order, so the values are
    mmengine's to the last bit. The lr reaches ``eta_min`` at the last iteration."""
    if iters <= warmup_iters:
        raise ValueError(f'{iters} iterations leave nothing after the {warmup_iters}-iteration warm-up; '
                         f'use more iterations or fewer warm-up iterations')
    poly_total = iters - warmup_iters - 1
    lr = base_lr * warmup_factor if warmup_iters > 0 else base_lr
    out = [lr]
    for step in range(1, iters):
        if step < warmup_iters:
            lr = lr * _linear_factor(step, warmup_iters, warmup_factor)
        elif step > warmup_iters:
            lr = (lr - eta_min) * (1 - 1 / (poly_total - (step - warmup_iters) + 1)) ** power + eta_min
        out.append(lr)
    return out


def step_schedule(base_lr: float, epochs: int, iters_per_epoch: int, milestones: Sequence[int],
                  warmup_iters: int = 1000, warmup_factor: float = 1e-3, gamma: float = 0.1) -> List[float]:
    """The lr of each iteration under mmdet's schedule: ``LinearLR(start_factor=warmup_factor, end=warmup_iters)``
    by iteration, chained with ``MultiStepLR(milestones, gamma)`` by epoch (stepped after each epoch's last
    iteration), with mmengine's chained formulas."""
    lr = base_lr * warmup_factor if warmup_iters > 0 else base_lr
    out = [lr]
    for step in range(1, epochs * iters_per_epoch):
        if step < warmup_iters:
            lr = lr * _linear_factor(step, warmup_iters, warmup_factor)
        if step % iters_per_epoch == 0 and step // iters_per_epoch in milestones:
            lr = lr * gamma ** list(milestones).count(step // iters_per_epoch)
        out.append(lr)
    return out


def scaled_milestones(epochs: int, published_epochs: int = 36, published: Sequence[int] = (27, 33)) -> List[int]:
    """The published milestones moved proportionally to ``epochs`` (36 epochs: 27 and 33)."""
    return [max(1, round(m * epochs / published_epochs)) for m in published]


# ---------------------------------------------------------------------------------------------------------------------
# optimiser


def _published_name(name: str) -> str:
    """The name the published (mmdet/mmseg) model gives parameter ``name``, as far as 'norm' matching goes:
    our stem's BatchNorms ``backbone.stem.norm{1,2}`` are ``backbone.patch_embed.conv_down.{1,4}`` there."""
    return name.replace('backbone.stem.norm1.', 'backbone.patch_embed.conv_down.1.').replace(
        'backbone.stem.norm2.', 'backbone.patch_embed.conv_down.4.')


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Two AdamW groups as the published configs' ``paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0)})``
    make them: mmengine's ``DefaultOptimWrapperConstructor`` gives weight decay 0 to every parameter whose full
    name contains 'norm' (a substring test on the published name: the backbone's LayerNorms and out-norms, but
    not its stem BatchNorms nor the heads' ConvModule BatchNorms, which mmcv names ``bn``)."""
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if 'norm' in _published_name(name) else decay).append(param)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.)]


# ---------------------------------------------------------------------------------------------------------------------
# SyncBatchNorm that also runs on CPUs (gloo)


class _AllReduceSum(torch.autograd.Function):
    """Sum over all processes; the gradient of each input is the sum of the output gradients of all processes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole batch across all processes.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this one works on any device and backend (gloo on CPUs)
    through autograd-aware all-reduces (two: the mean first, then the centred second moment, for precision).
    Outside training, or without a process group of several ranks, it is a plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        channels = x.shape[1]
        count = all_reduce(x.new_tensor([x.numel() // channels], dtype=torch.float32))
        mean = all_reduce(x.float().sum((0, 2, 3))) / count
        var = all_reduce(((x.float() - mean[:, None, None]) ** 2).sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1. / self.num_batches_tracked.item()
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = (x.float() - mean[:, None, None]) * torch.rsqrt(var + self.eps)[:, None, None]
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm2d synchronised across processes: torch's SyncBatchNorm on CUDA,
    ``SyncBatchNorm2d`` elsewhere (torch's refuses CPU tensors). Weights and statistics are kept."""
    if device.type == 'cuda':
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        sync = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, device=module.running_mean.device,
                               dtype=module.running_mean.dtype)
        sync.load_state_dict(module.state_dict())
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module


# ---------------------------------------------------------------------------------------------------------------------
# data: a deterministic stream of samples


class StreamSampler(torch.utils.data.Sampler):
    """Micro-batches of ``(epoch, index)`` for one rank, from iteration ``start`` to ``iters``.

    The data is an endless stream of permutations (one per epoch, from ``(seed, epoch)``); iteration ``s``
    takes stream positions ``s * total_batch ...``, in ``accumulation`` micro-batches of
    ``batch_size * world`` images, of which rank ``r`` takes the ``r``-th ``batch_size``.

    With ``groups`` (a group id per dataset index, e.g. ``DetectionDataset.aspect_groups()``), each iteration's
    images are first ordered by group (stably), so that a micro-batch holds images of one group, except at most
    one per iteration and group boundary: the grouping of mmdet's ``AspectRatioBatchSampler``, which keeps
    portrait and landscape images apart so that a batch is not padded to a square. Every iteration still takes
    the same images as without groups, so epochs, resuming and the world-size independence are unchanged.
    """

    def __init__(self, num_samples: int, total_batch: int, batch_size: int, world: int, rank: int, seed: int,
                 start: int, iters: int, groups: Optional[Sequence[int]] = None):
        if num_samples == 0:
            raise ValueError('the training set is empty')
        if groups is not None and len(groups) != num_samples:
            raise ValueError(f'groups has {len(groups)} entries for {num_samples} samples; expected one per sample')
        self.num_samples, self.total_batch, self.batch_size = num_samples, total_batch, batch_size
        self.world, self.rank, self.seed, self.start, self.iters = world, rank, seed, start, iters
        self.groups = None if groups is None else np.asarray(groups)
        self.accumulation = total_batch // (batch_size * world)
        self._order: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def position(self, p: int) -> Tuple[int, int]:
        """(epoch, dataset index) at stream position ``p``."""
        epoch = p // self.num_samples
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples))
        return epoch, int(self._order[1][p % self.num_samples])

    def iteration(self, step: int) -> List[Tuple[int, int]]:
        """Iteration ``step``'s ``total_batch`` keys, all ranks' micro-batches one after another."""
        keys = [self.position(p) for p in range(step * self.total_batch, (step + 1) * self.total_batch)]
        if self.groups is not None:
            keys.sort(key=lambda key: self.groups[key[1]])  # stable: stream order within a group
        return keys

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for step in range(self.start, self.iters):
            keys = self.iteration(step)
            for micro in range(self.accumulation):
                first = (micro * self.world + self.rank) * self.batch_size
                yield keys[first:first + self.batch_size]

    def __len__(self) -> int:
        return (self.iters - self.start) * self.accumulation


def train_sampler(train_set, config: 'DenseTrainConfig', world: int, rank: int, start: int,
                  iters: int) -> StreamSampler:
    """Rank ``rank``'s micro-batches of iterations ``start..iters``; a detection set's (with ``aspect_groups``)
    keep portrait and landscape images apart, as mmdet's ``AspectRatioBatchSampler`` does. ``config`` is resolved
    (``DenseTrainConfig.resolved``)."""
    if config.batch_size is None:
        raise ValueError('train_sampler needs a resolved config (DenseTrainConfig.resolved()): batch_size is None')
    groups = train_set.aspect_groups() if hasattr(train_set, 'aspect_groups') else None
    return StreamSampler(len(train_set), config.total_batch, config.batch_size, world, rank, config.seed, start,
                         iters, groups)


class EpochKeyed(torch.utils.data.Dataset):
    """``dataset[index]`` in ``epoch`` for an ``(epoch, index)`` key: ``dataset.set_epoch(epoch)`` first, so that a
    dataset that seeds each sample's augmentation from (seed, epoch, index) gets the epoch of the stream position
    in whichever worker process reads it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


# ---------------------------------------------------------------------------------------------------------------------
# the tasks: losses of a batch, and evaluation on the validation set


class _LossStep(nn.Module):
    """``model.loss(*batch)`` as ``forward``, so that DDP sees the forward pass it synchronises."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs, targets):
        return self.model.loss(inputs, targets)


def _as_loss_dict(out) -> Dict[str, torch.Tensor]:
    """A model's loss (a tensor, or mmdet's dict whose values are tensors or lists of tensors) as named scalars."""
    if isinstance(out, torch.Tensor):
        return {'loss': out}
    losses = {}
    for name, value in out.items():
        losses[name] = sum(v.mean() for v in value) if isinstance(value, (list, tuple)) else value.mean()
    return losses


def _total_loss(losses: Dict[str, torch.Tensor]) -> torch.Tensor:
    """mmengine's ``parse_losses``: the sum of the entries whose name contains 'loss'."""
    # a model's loss dict always holds a loss term, so sum's int start 0 is never what comes back
    return cast(torch.Tensor, sum(v for k, v in losses.items() if 'loss' in k))


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _shard(n: int, rank: int, world: int) -> range:
    return range(rank, n, world)


@torch.no_grad()
def evaluate_segmentation(model, val_set, amp: Optional[str], device: torch.device, rank: int = 0,
                          world: int = 1) -> Dict[str, Any]:
    """mIoU, mAcc, aAcc (percent) of ``model.predict`` on ``val_set.load(i)``: ``(image (H, W, 3) uint8 RGB,
    label (H, W))``, the counts summed over all ranks (each predicts every ``world``-th image)."""
    from .evaluate import intersect_and_union, segmentation_metrics
    num_classes = len(model.class_names)
    areas = torch.zeros(4, num_classes, dtype=torch.int64)
    for i in _shard(len(val_set), rank, world):
        image, label = val_set.load(i)
        with amp_autocast(device.type, amp):
            pred = model.predict(image, return_logits=False)[0]['labels']
        areas += intersect_and_union(pred.cpu(), torch.as_tensor(np.asarray(label)), num_classes)
    if world > 1:
        dist.all_reduce(areas)
    metrics = segmentation_metrics(areas, model.class_names)
    return dict(mIoU=metrics['mIoU'], mAcc=metrics['mAcc'], aAcc=metrics['aAcc'])


@torch.no_grad()
def evaluate_detection(model, val_set, amp: Optional[str], device: torch.device, rank: int = 0,
                       world: int = 1) -> Dict[str, Any]:
    """COCO box (and mask) AP (percent) of ``model.predict`` on a ``DetectionDataset``: images from ``load(i)``,
    ids from ``records[i].image_id``, labels written as ``category_ids[label]``, the ground truth its
    ``coco_ground_truth()``. Predictions of all ranks are gathered on rank 0, which evaluates; others get {}."""
    from .evaluate import coco_evaluate, coco_results
    results = []
    for i in _shard(len(val_set), rank, world):
        image, _ = val_set.load(i)
        with amp_autocast(device.type, amp):
            detections = {k: v.cpu() for k, v in model.predict(image)[0].items()}
        results += coco_results([detections], [val_set.records[i].image_id], val_set.category_ids)
    if world > 1:
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    if rank != 0:
        return {}
    coco = val_set.coco_ground_truth()
    metrics = {f'bbox_{k}': v for k, v in coco_evaluate(coco, results, 'bbox').items()}
    if getattr(val_set, 'with_masks', False):
        metrics.update({f'segm_{k}': v for k, v in coco_evaluate(coco, results, 'segm').items()})
    return metrics


_EVALUATE = {'seg': evaluate_segmentation, 'det': evaluate_detection}


# ---------------------------------------------------------------------------------------------------------------------
# the run


@dataclasses.dataclass
class DenseTrainConfig:
    """Settings of a dense training run; None means the published recipe's value for ``task`` and the
    variant named in ``model_name`` (see ``recipe``).

    Args:
        task: 'seg' (iteration-based) or 'det' (epoch-based schedule, counted in iterations).
        output: folder for checkpoints, ``config.json`` and logs.
        model_name: the model's name, recorded in the checkpoints (its variant picks lr and weight decay).
        iters: segmentation iterations (160k). epochs: detection epochs (36; the lr steps move with them).
        lr, weight_decay: AdamW's (betas 0.9, 0.999); no decay on 'norm' parameters.
        warmup_iters: LinearLR warm-up (1500 seg, 1000 det).
        total_batch: images per optimiser step (16) = batch_size x processes x accumulation steps.
        batch_size: images per process and forward pass (2).
        amp: 'bf16', 'fp16' (with a gradient scaler), 'none', or 'auto': bf16 on CUDA GPUs that have it
            (else fp16), none on CPUs (bf16 autocast is opt-in there: ``amp='bf16'``).
        eval_interval: validate every this many iterations (seg, 16000) or epochs (det, 1); 0: only at the end.
        checkpoint_interval: write ``last.pth`` every this many iterations (default: at each evaluation).
        log_interval: iterations per row of ``metrics.jsonl``.
        clip_grad: clip the gradient norm to this (None: no clipping, as published).
        seed: the data order, augmentation and dropout/drop-path seeds.
        workers: DataLoader worker processes per rank (results do not depend on it).
        device: 'cpu', 'cuda' (default: CUDA when available; torchrun: one GPU per rank).
        resume: a ``last.pth`` of this engine: continue exactly where it stopped.
        sync_bn: under DDP, 'heads': the heads' BatchNorms synchronised across processes (the published
            configs' SyncBN; the backbone's stem BatchNorms stay per process, as the published runs had them),
            'all': every BatchNorm, 'none'.
    """
    task: str
    output: str
    model_name: str = ''
    iters: Optional[int] = None
    epochs: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup_iters: Optional[int] = None
    total_batch: int = 16
    batch_size: Optional[int] = None
    amp: str = 'auto'
    eval_interval: Optional[int] = None
    checkpoint_interval: Optional[int] = None
    log_interval: int = 50
    clip_grad: Optional[float] = None
    seed: int = 0
    workers: int = 2
    device: Optional[str] = None
    resume: Optional[str] = None
    sync_bn: str = 'heads'

    def resolved(self) -> 'DenseTrainConfig':
        """A copy with every None replaced by the recipe's value."""
        defaults = recipe(self.task, self.model_name)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ('lr', 'weight_decay', 'warmup_iters', 'batch_size', 'eval_interval'):
            if values[key] is None:
                values[key] = defaults[key]
        if self.task == 'seg' and values['iters'] is None:
            values['iters'] = defaults['iters']
        if self.task == 'det' and values['epochs'] is None:
            values['epochs'] = defaults['epochs']
        return DenseTrainConfig(**values)


def _resolve_amp(amp: str, device: torch.device) -> Optional[str]:
    if amp not in ('auto', 'bf16', 'fp16', 'none', None):
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'none', got {amp!r}")
    if amp == 'auto':
        if device.type != 'cuda':
            return None
        return 'bf16' if torch.cuda.is_bf16_supported() else 'fp16'
    return None if amp in ('none', None) else amp


def _batch_split(total_batch: int, batch_size: int, world: int) -> int:
    """Gradient-accumulation steps that make ``total_batch`` from ``batch_size`` images on ``world`` processes."""
    per_pass = batch_size * world
    if total_batch % per_pass:
        raise ValueError(f'{total_batch} images per step cannot be made of {batch_size} per process x {world} '
                         f'process(es); pick a batch size such that batch size x processes divides {total_batch}')
    return total_batch // per_pass


def _meta(model: nn.Module, config: DenseTrainConfig, iteration: int, metrics: Dict[str, Any]) -> Dict[str, Any]:
    class_names = cast(List[str], model.class_names)  # UPerNet and CascadeMaskRCNN both hold them
    return dict(dataset_meta=dict(classes=list(class_names), palette=[list(c) for c in model.palette]),
                model=config.model_name, task=config.task, num_classes=len(class_names), iteration=iteration,
                metrics=dict(metrics))


class _Logger:
    """Rank 0's outputs: ``metrics.jsonl`` rows and, when tensorboard is installed, TensorBoard scalars."""

    def __init__(self, output: str, enabled: bool):
        self.enabled, self.path, self.writer = enabled, os.path.join(output, 'metrics.jsonl'), None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(output, 'tensorboard'))
            except ImportError:  # tensorboard is optional
                pass

    def row(self, kind: str, iteration: int, values: Dict[str, Any]):
        if not self.enabled:
            return
        with open(self.path, 'a') as f:
            f.write(json.dumps(dict(kind=kind, iter=iteration, **values)) + '\n')
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f'{kind}/{key}', value, iteration)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def train_dense(model: nn.Module, config: DenseTrainConfig, train_set, collate: Callable,
                val_set=None) -> Dict[str, Any]:
    """Train ``model`` (a ``UPerNet`` or ``CascadeMaskRCNN``, with ``loss(inputs, targets)`` and ``predict``)
    under ``config``; in one process, or in each process of a torchrun (or an initialised process group).

    Args:
        train_set: a training dataset (``mambavision.dense.data``'s ``SegmentationDataset`` /
            ``DetectionDataset`` with their training pipelines): ``train_set[i]`` is sample ``i`` augmented with
            a generator seeded from (its seed, the epoch set by ``set_epoch``, i).
        collate: a list of samples -> ``(inputs, targets)`` for ``model.loss``.
        val_set: a validation dataset whose ``load(i)`` gives ``(image (H, W, 3) uint8 RGB, label or target)``
            (see ``evaluate_segmentation`` / ``evaluate_detection``); None: no validation.

    Returns a summary: the last iteration, the best validation metrics and the checkpoint paths.
    """
    config = config.resolved()
    if not config.resume and os.path.exists(os.path.join(config.output, 'last.pth')):
        raise FileExistsError(f'{config.output} already holds a run; resume it with resume={config.output}/last.pth '
                              f'(--resume) or choose another output folder')
    own_group = not (dist.is_available() and dist.is_initialized())
    device, rank, world = init_distributed(config.device)
    try:
        return _train(model, config, train_set, collate, val_set, device, rank, world)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(model, config, train_set, collate, val_set, device, rank, world) -> Dict[str, Any]:
    amp = _resolve_amp(config.amp, device)
    accumulation = _batch_split(config.total_batch, config.batch_size, world)
    if config.task == 'seg' and config.batch_size * (world if config.sync_bn != 'none' else 1) < 2:
        raise ValueError('the pyramid pooling BatchNorm of a 1x1 map needs 2 or more images per forward pass (batch '
                         'size x processes with SyncBN); pick a batch size of 2 or more')
    if config.task == 'seg':
        iters_per_epoch = max(1, len(train_set) // config.total_batch)
        iters = config.iters
        lrs = poly_schedule(config.lr, iters, config.warmup_iters, 1e-6)
        eval_every = config.eval_interval
    else:
        iters_per_epoch = max(1, math.ceil(len(train_set) / config.total_batch))
        iters = config.epochs * iters_per_epoch
        lrs = step_schedule(config.lr, config.epochs, iters_per_epoch, scaled_milestones(config.epochs),
                            config.warmup_iters, 1e-3)
        eval_every = config.eval_interval * iters_per_epoch
    checkpoint_every = config.checkpoint_interval or eval_every or iters

    model.to(device)
    if config.sync_bn not in ('heads', 'all', 'none'):
        raise ValueError(f"sync_bn must be 'heads', 'all' or 'none', got {config.sync_bn!r}")
    if world > 1 and config.sync_bn != 'none':
        for name, child in list(model.named_children()):
            if name != 'backbone' or config.sync_bn == 'all':
                setattr(model, name, convert_sync_batchnorm(child, device))
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type) if amp == 'fp16' else None
    start, best = 0, None
    if config.resume:
        start, best = _resume(config.resume, config, model, optimizer, scaler)
    step_module: nn.Module = _LossStep(model)
    if world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=config.task == 'det')

    sampler = train_sampler(train_set, config, world, rank, start, iters)
    loader = torch.utils.data.DataLoader(
        EpochKeyed(train_set), batch_sampler=sampler, collate_fn=collate,
        num_workers=config.workers, pin_memory=device.type == 'cuda', persistent_workers=False)
    logger = _Logger(config.output, rank == 0)
    if rank == 0:
        os.makedirs(config.output, exist_ok=True)
        with open(os.path.join(config.output, 'config.json'), 'w') as f:
            json.dump(dict(dataclasses.asdict(config), world_size=world, accumulation=accumulation,
                           amp_resolved=amp, iters_total=iters, iters_per_epoch=iters_per_epoch), f, indent=2)
        _logger.info(
            f'{config.total_batch} images per step = {config.batch_size} per process x {world} process(es) x '
            f'{accumulation} accumulation step(s); BatchNorm statistics over {config.batch_size * world} images; '
            f'{len(train_set)} training images, {iters_per_epoch} iterations per epoch, iterations {start}..{iters}, '
            f'amp {amp or "off"} on {device}')
    try:
        best = _loop(step_module, model, optimizer, scaler, loader, lrs, config, device, rank, world, amp,
                     accumulation, start, iters, eval_every, checkpoint_every, val_set, logger, best)
    finally:
        logger.close()
    if world > 1:
        dist.barrier()  # rank 0's checkpoints are written when any rank returns
    return dict(iteration=iters, best=best, last=os.path.join(config.output, 'last.pth'),
                best_checkpoint=os.path.join(config.output, 'best.pth') if best else None)


def _resume(path: str, config: DenseTrainConfig, model, optimizer, scaler) -> Tuple[int, Optional[Dict[str, Any]]]:
    from ..weights import read_checkpoint
    checkpoint = read_checkpoint(path)
    if 'optimizer' not in checkpoint or 'iteration' not in checkpoint:
        raise ValueError(f'{path} is not a training checkpoint of the dense trainer (no optimiser state or '
                         f'iteration); start from its weights with pretrained/checkpoint instead')
    model.load_state_dict(checkpoint['state_dict'])
    optimizer.load_state_dict(checkpoint['optimizer'])
    if scaler is not None and checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    saved = checkpoint.get('config') or {}
    changed = [k for k in _EXACT_RESUME_KEYS if k in saved and saved[k] != getattr(config, k)]
    if changed:
        _logger.warning(f'{path} was trained with other {", ".join(changed)}: following these settings, the run '
                        f'will not equal an uninterrupted one')
    _logger.info(f'resumed from {path} at iteration {checkpoint["iteration"]}')
    return checkpoint['iteration'], checkpoint.get('best')


_EXACT_RESUME_KEYS = ('task', 'iters', 'epochs', 'lr', 'weight_decay', 'warmup_iters', 'total_batch', 'seed')


def _torch_seed(seed: int, iteration: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1, np.uint64)[0] >> 1)


def _loop(step_module, model, optimizer, scaler, loader, lrs, config, device, rank, world, amp, accumulation,
          start, iters, eval_every, checkpoint_every, val_set, logger, best):
    from tqdm import tqdm

    best_key = _BEST_METRIC[config.task]
    batches = iter(loader)
    bar = tqdm(total=iters, initial=start, desc=f'train {config.task}', disable=None if rank == 0 else True,
               dynamic_ncols=True)
    sums: Dict[str, float] = {}
    window_start, window_iters = time.perf_counter(), 0
    for iteration in range(start, iters):
        model.train()
        for group in optimizer.param_groups:
            group['lr'] = lrs[iteration]
        torch.manual_seed(_torch_seed(config.seed, iteration, rank))
        for micro in range(accumulation):
            inputs, targets = _to_device(next(batches), device)
            sync = micro == accumulation - 1 or not isinstance(step_module, nn.parallel.DistributedDataParallel)
            with contextlib.nullcontext() if sync else step_module.no_sync():
                with amp_autocast(device.type, amp):
                    losses = _as_loss_dict(step_module(inputs, targets))
                loss = _total_loss(losses)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f'the loss is {loss.item()} at iteration {iteration}; try a lower lr, '
                                             f'amp bf16 or clip_grad')
                (scaler.scale(loss / accumulation) if scaler is not None else loss / accumulation).backward()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.) + value.item() / accumulation
        if scaler is not None:
            scaler.unscale_(optimizer)
        if config.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = iteration + 1
        window_iters += 1
        bar.update(1)
        if rank == 0:
            bar.set_postfix(loss=f'{_sum_losses(sums) / window_iters:.4f}', lr=f'{lrs[iteration]:.2e}')
        if done % config.log_interval == 0 or done == iters:
            seconds = time.perf_counter() - window_start
            row = {k: v / window_iters for k, v in sums.items()}
            row.update(lr=lrs[iteration], iters_per_s=window_iters / seconds,
                       images_per_s=window_iters * config.total_batch / seconds)
            if device.type == 'cuda':
                row['max_memory_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            logger.row('train', done, row)
            if rank == 0:
                _logger.info(f'iteration {done}/{iters}: loss {_sum_losses(sums) / window_iters:.4f}, '
                             f'lr {lrs[iteration]:.3g}, {row["iters_per_s"]:.3f} it/s')
            sums, window_start, window_iters = {}, time.perf_counter(), 0
        metrics = None
        if val_set is not None and eval_every and (done % eval_every == 0 or done == iters):
            metrics = _EVALUATE[config.task](model, val_set, amp, device, rank, world)
            if rank == 0:
                logger.row('val', done, metrics)
                _logger.info(f'iteration {done}: ' + ', '.join(f'{k} {v:.2f}' for k, v in metrics.items()))
                if best is None or metrics[best_key] > best[best_key]:
                    best = dict(metrics, iteration=done)
                    save_checkpoint(dict(state_dict=model.state_dict(), meta=_meta(model, config, done, metrics)),
                                    os.path.join(config.output, 'best.pth'))
        if rank == 0 and (done % checkpoint_every == 0 or done == iters):
            save_checkpoint(dict(state_dict=model.state_dict(), meta=_meta(model, config, done, metrics or {}),
                                 optimizer=optimizer.state_dict(),
                                 scaler=scaler.state_dict() if scaler is not None else None,
                                 iteration=done, best=best, config=dataclasses.asdict(config)),
                            os.path.join(config.output, 'last.pth'))
        if world > 1 and metrics is not None:
            best = _broadcast(best)
    bar.close()
    return best


def _sum_losses(sums: Dict[str, float]) -> float:
    return sum(v for k, v in sums.items() if 'loss' in k)


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------------------------
# entry points: data folder + model name -> a run


def train_segmenter(data_dir: str, output: str, model: str = 'upernet_mambavision_t',
                    pretrained: Union[bool, str] = False, backbone: Optional[str] = None,
                    drop_path_rate: float = 0.2, crop_size: Optional[int] = None, val_dir: Optional[str] = None,
                    **options) -> Dict[str, Any]:
    """Fine-tune a UPerNet on a segmentation folder or ADE20K with the published recipe.

    Args:
        data_dir: ``train/`` and ``val/`` of one's own data (``images/``, ``masks/``, ``classes.txt``) or
            ``ADEChallengeData2016`` (see ``mambavision.dense.data.segmentation_split``).
        output: the run's folder.
        model: a published segmenter or its architecture ('upernet_mambavision_t').
        pretrained: start from the published segmenter (True) or a local one (a path): with another class count
            both classifiers start fresh. backbone: or from ImageNet weights in the backbone ('mambavision_t.nv_in1k'
            or a file), as the published runs did.
        drop_path_rate: the backbone's stochastic depth (0.2: what every published run trained with).
        crop_size: the training crop (default: the published one, 512; 640 for L3).
        val_dir: another folder for validation (default: ``data_dir``'s val split).
        options: ``DenseTrainConfig`` fields (iters, lr, batch_size, amp, eval_interval, resume, seed, ...).
    """
    from .data import SegmentationDataset, SegmentationTrainPipeline, collate_segmentation, segmentation_split
    from .factory import published_entry
    from .segmentation import segmenter_for_training

    train_split = segmentation_split(data_dir, 'train')
    val_split = segmentation_split(val_dir or data_dir, 'val')
    if tuple(val_split.class_names) != tuple(train_split.class_names):
        raise ValueError(f'the validation data has other classes than the training data ({len(val_split.class_names)} '
                         f'against {len(train_split.class_names)}); expected the same class list')
    crop = crop_size or published_entry('seg', model).test_scale[1]
    config = DenseTrainConfig(task='seg', output=output, model_name=model, **options)
    net = segmenter_for_training(
        model, class_names=train_split.class_names, palette=train_split.palette, pretrained=pretrained,
        backbone_weights=backbone, drop_path_rate=drop_path_rate)
    train_set = SegmentationDataset(train_split, SegmentationTrainPipeline(crop), seed=config.seed)
    return train_dense(net, config, train_set, functools.partial(collate_segmentation, size=(crop, crop)),
                       SegmentationDataset(val_split))


def train_detector(data_dir: Optional[str], output: str, model: str = 'cascade_mask_rcnn_mambavision_t',
                   pretrained: Union[bool, str] = False, backbone: Optional[str] = None,
                   drop_path_rate: float = 0.2, val_dir: Optional[str] = None, **options) -> Dict[str, Any]:
    """Fine-tune a Cascade Mask R-CNN on a COCO-format or YOLO-format dataset with the published 3x recipe.

    Args:
        data_dir: ``train.json`` + ``train/`` and ``val.json`` + ``val/`` (COCO), or a YOLO ``data.yaml`` folder
            (see ``mambavision.dense.data.detection_dataset``). Boxes-only data trains a Cascade R-CNN (no mask
            losses; predictions without masks).
        output: the run's folder.
        model: a published detector or its architecture ('cascade_mask_rcnn_mambavision_t').
        pretrained: the published detector's weights (True) or a local file; backbone: or ImageNet weights in the
            backbone ('mambavision_t.nv_in1k' or a file), everything above fresh.
        drop_path_rate: the backbone's stochastic depth (0.2: what every published run trained with).
        val_dir: another dataset folder for validation (default: ``data_dir``'s val split).
        options: ``DenseTrainConfig`` fields (epochs, lr, batch_size, amp, eval_interval, resume, seed, ...).
    """
    from .data import collate_detection, detection_dataset
    from .detection import create_detector
    from .segmentation import _load_backbone_weights

    if pretrained and backbone:
        raise ValueError('start from a pretrained detector or from backbone weights, not both')
    config = DenseTrainConfig(task='det', output=output, model_name=model, **options)
    train_set = detection_dataset(data_dir, 'train', seed=config.seed)
    val_set = detection_dataset(val_dir or data_dir, 'val')
    net = create_detector(
        model, pretrained=pretrained is True, checkpoint_path=pretrained if isinstance(pretrained, str) else None,
        backbone_kwargs=dict(drop_path_rate=drop_path_rate), num_classes=len(train_set.class_names),
        class_names=train_set.class_names)
    if backbone:
        _load_backbone_weights(net.backbone, backbone)
    return train_dense(net.train(), config, train_set, collate_detection, val_set)
