"""Training speed and peak memory of the dense models: one optimiser step (forward, loss, backward, AdamW) at the
published training size, side by side with the published-style step.

- ``seg``: UPerNet-T on a 512x512 crop (the published crop), 2 images per process (the published T run had 1 per
  GPU with SyncBN over 16 GPUs; one process needs 2, since the pyramid pooling's BatchNorm of a 1x1 map needs more
  than one value), ADE20K's 150 classes, random labels.
- ``det``: Cascade Mask R-CNN-T on an 800x1216 padded batch (a 1199x800 image at the published 3x scale range's
  top), 2 images per process (the published batch per GPU), 80 classes, 5 objects per image with masks.

Configurations, each in a fresh process (so that its peak resident memory is its own):

- ``published``: the published arithmetic as it runs on this device: the sequential reference scan
  (``selective_scan_ref``'s loop), float32;
- ``fp32``: this library's default scan for the device, float32;
- ``bf16``: the same under bfloat16 autocast (on a CPU: where bf16 is fast, i.e. with AVX512-BF16 / AMX).

Reported: seconds per step (median of ``--steps`` after ``--warmup`` untimed steps), iterations per second, and
peak memory (CPU: resident set size above the size after building the model; CUDA: ``max_memory_allocated``).
Weights are random; the data is synthetic.

    python benchmarks/dense_train.py --tasks seg det --steps 3 --output dense_train.md
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import mambavision  # noqa: E402

CONFIGS = ('published', 'fp32', 'bf16')
BATCH = 2


def _segmentation_batch(device):
    from mambavision.dense.segmentation import segmenter_for_training
    model = segmenter_for_training('upernet_mambavision_t').to(device)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(BATCH, 3, 512, 512, generator=generator).to(device)
    labels = torch.randint(0, 150, (BATCH, 512, 512), generator=generator).to(device)
    return model, inputs, labels


def _detection_batch(device):
    from mambavision.dense.detection import create_detector
    model = create_detector('cascade_mask_rcnn_mambavision_t', backbone_kwargs=dict(drop_path_rate=0.2)).train()
    model.to(device)
    generator = torch.Generator().manual_seed(0)
    height, width = 800, 1199
    inputs = torch.zeros(BATCH, 3, 800, 1216)
    inputs[:, :, :height, :width] = torch.randn(BATCH, 3, height, width, generator=generator)
    targets = []
    for _ in range(BATCH):
        corners = torch.rand(5, 2, generator=generator) * torch.tensor([width - 200, height - 200])
        sizes = 50 + torch.rand(5, 2, generator=generator) * 150
        boxes = torch.cat([corners, corners + sizes], 1)
        masks = torch.zeros(5, height, width, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.round().int().tolist()):
            mask[y1:y2, x1:x2] = 1
        targets.append(dict(boxes=boxes.to(device), labels=torch.randint(0, 80, (5,), generator=generator).to(device),
                            masks=masks.to(device), image_size=(height, width)))
    return model, inputs.to(device), targets


def _loss(model, inputs, targets):
    out = model.loss(inputs, targets)
    if isinstance(out, torch.Tensor):
        return out
    return sum(sum(v) if isinstance(v, (list, tuple)) else v for k, v in out.items() if 'loss' in k)


def run_one(task: str, config: str, device: str, steps: int, warmup: int) -> dict:
    """Time ``steps`` training steps of ``task`` in ``config`` (in this process)."""
    device = torch.device(device)
    mambavision.set_scan_backend('reference' if config == 'published' else None)
    model, inputs, targets = (_segmentation_batch if task == 'seg' else _detection_batch)(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config == 'bf16')
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        with autocast:
            loss = _loss(model, inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    if device.type == 'cuda':
        peak_mib = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:  # ru_maxrss is KiB on Linux
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return dict(task=task, config=config, seconds_per_step=seconds, iters_per_s=1 / seconds, peak_mib=peak_mib,
                loss=loss.item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tasks', nargs='+', choices=('seg', 'det'), default=['seg', 'det'])
    parser.add_argument('--configs', nargs='+', choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--steps', type=int, default=3, help='timed steps per configuration')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps first')
    parser.add_argument('--threads', type=int, help='torch threads (default: all cores)')
    parser.add_argument('--output', help='also write the table (Markdown) here')
    parser.add_argument('--one', nargs=2, metavar=('TASK', 'CONFIG'), help=argparse.SUPPRESS)  # a child's job
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(*args.one, args.device, args.steps, args.warmup)))
        return
    rows = []
    for task in args.tasks:
        for config in args.configs:
            command = [sys.executable, __file__, '--one', task, config, '--device', args.device,
                       '--steps', str(args.steps), '--warmup', str(args.warmup)]
            command += ['--threads', str(args.threads)] if args.threads else []
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                print(f'{task} {config} failed: {out.stderr.strip().splitlines()[-1]}', file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    name = torch.cuda.get_device_name() if args.device.startswith('cuda') else platform.processor() or 'CPU'
    lines = [f'Dense training step, {name}, torch {torch.__version__}, {torch.get_num_threads()} threads, '
             f'batch {BATCH} per process, median of {args.steps} steps after {args.warmup}',
             '', '| task | configuration | s / step | iterations / s | speed-up vs published | peak memory, MiB |',
             '|---|---|---|---|---|---|']
    for row in rows:
        base = next((r for r in rows if r['task'] == row['task'] and r['config'] == 'published'), None)
        speedup = f'{base["seconds_per_step"] / row["seconds_per_step"]:.2f}x' if base else '-'
        lines.append(f'| {row["task"]} | {row["config"]} | {row["seconds_per_step"]:.2f} | {row["iters_per_s"]:.3f} | '
                     f'{speedup} | {row["peak_mib"]:.0f} |')
    text = '\n'.join(lines)
    print(text)
    if args.output:
        with open(args.output, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
