"""CPU latency and peak memory of the published detection and segmentation pipelines, side by side.

``predict`` of UPerNet-T (one 683x512 image, ADE20K protocol) and Cascade Mask R-CNN-T (one
1199x800 image, COCO protocol), whole pipeline (resize, network, post-processing), in:

- ``published``: the published backbone's arithmetic as it runs on a CPU: the sequential
  reference scan, float32 (the baseline; the published code itself cannot run on a CPU);
- ``fp32``: this library's default CPU scan (the C kernel), float32;
- ``bf16``: the same under bfloat16 autocast;
- ``bf16+fused``: BatchNorm folded into the backbone's convs and conv/linear weights stored in
  bfloat16 (``fuse_for_inference`` + ``cast_for_autocast``), under autocast.

Latency: all configurations run in this one process on the same image, interleaved round by
round (the order rotates), after ``--warmup`` untimed calls; reported are the median seconds and
the median over rounds of the per-round speed-up over ``published``, so load drifting over the
run cancels out. Memory: each configuration runs one ``predict`` in a fresh process, and the
peak resident set size (``getrusage``) above the size after building the model is reported.
``where the time goes`` splits the ``fp32`` run by part of the pipeline.

Weights are random, made to behave like trained ones where it matters for the work done: the
detector's classifiers favour a few classes, so that the full 100 detections (masks included)
come out, as they do on a real image.

    python benchmarks/dense.py --output dense.md      # about 15-25 min on 2 idle cores
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import mambavision  # noqa: E402
from mambavision.inference import cast_for_autocast, fuse_for_inference  # noqa: E402

TASKS = {
    'segmentation': ('upernet_mambavision_t.nv_ade20k', (512, 683)),
    'detection': ('cascade_mask_rcnn_mambavision_t.nv_coco', (800, 1199)),
}
CONFIGS = ('published', 'fp32', 'bf16', 'bf16+fused')
# parts of each pipeline timed for 'where the time goes': (attribute path, method)
PARTS = {
    'segmentation': [('backbone', 'forward_intermediates'), ('decode_head', 'forward'), ('', '_postprocess')],
    'detection': [('backbone', 'forward_intermediates'), ('neck', 'forward'), ('rpn_head', 'predict'),
                  ('roi_head', 'refine_boxes'), ('roi_head', 'mask_probs')],
}


def build(task: str, config: str):
    """The task's model in ``config`` and the function that runs one ``predict`` of the benchmark image."""
    name, (h, w) = TASKS[task]
    torch.manual_seed(0)
    create = mambavision.create_detector if task == 'detection' else mambavision.create_segmenter
    model = create(name).eval()
    if task == 'detection':
        with torch.no_grad():  # a few classes win, so that 100 detections with masks come out
            for head in model.roi_head.bbox_head:
                head.fc_cls.bias[:5] += 6.
    if config == 'bf16+fused':
        fuse_for_inference(model.backbone)
        cast_for_autocast(model)
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    backend = 'reference' if config == 'published' else None
    autocast = config.startswith('bf16')

    def run():
        mambavision.set_scan_backend(backend)
        with torch.autocast('cpu', torch.bfloat16, enabled=autocast):
            return model.predict(image)
    return model, run


@contextlib.contextmanager
def timed_parts(model, parts, totals: Dict[str, float]):
    """Adds the seconds spent in each (attribute, method) of ``model`` to ``totals`` while inside."""
    patched = []
    for attr, method in parts:
        owner = model.get_submodule(attr) if attr else model
        original = getattr(owner, method)
        key = f'{attr or type(model).__name__}.{method}'

        def wrapper(*args, _original=original, _key=key, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[_key] = totals.get(_key, 0.) + time.perf_counter() - start
        setattr(owner, method, wrapper)
        patched.append((owner, method))
    try:
        yield totals
    finally:
        for owner, method in patched:
            delattr(owner, method)


def time_task(task: str, warmup: int, repeats: int) -> dict:
    runs = {config: build(task, config)[1] for config in CONFIGS}
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: Dict[str, List[float]] = {config: [] for config in CONFIGS}
    for r in range(repeats):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for config in order:
            start = time.perf_counter()
            runs[config]()
            times[config].append(time.perf_counter() - start)
    speedups = {c: statistics.median(p / t for p, t in zip(times['published'], times[c])) for c in CONFIGS}
    model, run = build(task, 'fp32')
    run()  # warm-up, as the timed configurations had
    totals: Dict[str, float] = {}
    with timed_parts(model, PARTS[task], totals):
        start = time.perf_counter()
        detections = run()
        totals['total'] = time.perf_counter() - start
    outputs = {k: tuple(v.shape) for k, v in detections[0].items()}
    return dict(seconds={c: statistics.median(t) for c, t in times.items()}, speedup=speedups,
                times=times, parts=totals, outputs=outputs)


def _status_mib(field: str) -> float:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':')) / 1024


def child(task: str, config: str) -> dict:
    """One predict in this fresh process: its peak RSS above the RSS of the built model.

    The peak is the kernel's high-water mark (VmHWM), reset after the model is built
    (``/proc/self/clear_refs``), so that building the model does not count.
    """
    _, run = build(task, config)
    model_mib = _status_mib('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset VmHWM to the current RSS
    run()
    return dict(model_mib=model_mib, peak_above_model_mib=_status_mib('VmHWM') - model_mib)


def measure_memory(task: str, config: str) -> dict:
    out = subprocess.run([sys.executable, __file__, '--child', json.dumps([task, config])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = []
    for task, r in results.items():
        name, (h, w) = TASKS[task]
        lines += [f'\n### {name}, one {w}x{h} image\n',
                  '| configuration | median s | speed-up vs published | peak memory above the model, MiB |',
                  '|---|---|---|---|']
        for config in CONFIGS:
            mem = r['memory'][config]['peak_above_model_mib']
            lines.append(f"| {config} | {r['seconds'][config]:.2f} | {r['speedup'][config]:.2f}x | {mem:.0f} |")
        parts = r['parts']
        lines.append('\nwhere the time goes (fp32): ' + ', '.join(
            f'{k} {v:.2f} s ({100 * v / parts["total"]:.0f}%)' for k, v in parts.items() if k != 'total')
            + f', rest (resize, normalisation, post-processing) '
              f'{parts["total"] - sum(v for k, v in parts.items() if k != "total"):.2f} s; outputs {r["outputs"]}')
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tasks', nargs='+', default=list(TASKS), choices=list(TASKS))
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--output', help='also write the markdown table here')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    results = {}
    for task in args.tasks:
        results[task] = time_task(task, args.warmup, args.repeats)
        results[task]['memory'] = {config: measure_memory(task, config) for config in CONFIGS}
    header = (f'{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
              f'torch {torch.__version__}, {torch.get_num_threads()} threads\n'
              f'`python benchmarks/{os.path.basename(__file__)} {shlex.join(sys.argv[1:])}`')
    text = header + '\n' + table(results)
    print(text)
    print(json.dumps({t: {k: v for k, v in r.items()} for t, r in results.items()}, indent=1, default=str))
    if args.output:
        with open(args.output, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
