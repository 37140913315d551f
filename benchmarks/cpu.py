"""CPU inference benchmark: mambavision_t's scan backends x precisions x inference paths, and timm peers.

Every variant runs in this one process on the same input; variants are interleaved
within each round (the order rotates per round), and each gets ``--warmup`` untimed
calls first (compilation happens there). Reported: median latency, images/s, and the
speed-up over ``mambavision_t`` with the sequential ``reference`` scan in float32 (what
the published code amounts to on a CPU), taken as the median over rounds of the
per-round ratio, so that load drifting over the run cancels out.

Weights: timm's random init gives near-zero logits, which would hide precision
errors, so every model gets PyTorch's default conv/linear init, Mamba's step-size
init (dt in [1e-3, 1e-1]) and BatchNorm statistics measured on two random batches.
``rel err`` is ||logits - logits_fp32||_2 / ||logits_fp32||_2 over the whole batch,
against the reference-scan float32 model (for peers, against their own float32 run).

    python benchmarks/cpu.py --output cpu.md              # about 2-4 min on 2 idle cores
    python benchmarks/cpu.py --compile --profile          # adds compiled variants and the scan's profiled share
"""
import argparse
import copy
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch
from torch import nn

import timm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
import mambavision  # noqa: E402  (registers the models)
from mambavision.inference import optimize_for_inference  # noqa: E402
from mambavision.model import MambaVisionMixer  # noqa: E402

PEERS = ('convnext_tiny', 'swin_tiny_patch4_window7_224', 'resnet50')


def realistic_init(model: nn.Module, seed: int = 0, img_size: int = 224) -> nn.Module:
    """Weights that give O(1) logits: default conv/linear init, Mamba dt init, BN stats from random batches."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)):
            m.reset_parameters()
        if isinstance(m, MambaVisionMixer):
            dt = torch.exp(torch.rand(m.dt_proj.bias.shape) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            with torch.no_grad():  # the bias enters twice (see the mixer), so half the inverse softplus each time
                m.dt_proj.bias.copy_((dt + torch.log(-torch.expm1(-dt))) / 2)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, img_size, img_size))
    return model.eval()


def machine() -> str:
    cpu = platform.processor() or 'unknown CPU'
    flags = ''
    try:
        with open('/proc/cpuinfo') as f:
            info = f.read()
        cpu = next(line.split(':', 1)[1].strip() for line in info.splitlines() if line.startswith('model name'))
        flags = ' '.join(x for x in ('avx512f', 'avx512_bf16', 'amx_bf16') if f' {x}' in info)
    except (OSError, StopIteration):
        pass
    return (f'{cpu}, {os.cpu_count()} logical cores ({flags or "no avx512"}), torch {torch.__version__} '
            f'({torch.get_num_threads()} threads), timm {timm.__version__}, python {platform.python_version()}')


class Variant:
    def __init__(self, name: str, model: nn.Module, backend: str = None, bf16: bool = False, baseline: str = None):
        self.name, self.model, self.backend, self.bf16, self.baseline = name, model, backend, bf16, baseline
        self.times: List[float] = []
        self.out = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend:
            mambavision.set_scan_backend(self.backend)
        with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16, enabled=self.bf16):
            return self.model(x)


def build_variants(args) -> List[Variant]:
    mv = realistic_init(timm.create_model('mambavision_t'))
    base = 'mambavision_t reference fp32'
    vs = [Variant(base, mv, 'reference')]
    backends = mambavision.available_scan_backends('cpu')  # fastest first, 'reference' last
    for backend in backends:
        for bf16 in (False, True):
            name = f'mambavision_t {backend} {"bf16" if bf16 else "fp32"}'
            if name != base:
                vs.append(Variant(name, mv, backend, bf16, baseline=base))
    for compile in (False, True) if args.compile else (False,):
        for dtype in (None, torch.bfloat16) if compile else (torch.bfloat16,):
            fast = optimize_for_inference(copy.deepcopy(mv), dtype, compile)
            vs.append(Variant(f'mambavision_t {backends[0]} optimize_for_inference({"bf16" if dtype else "fp32"}'
                              f'{", compile" if compile else ""})', fast, backends[0], baseline=base))
    for name in args.peers:
        peer = realistic_init(timm.create_model(name))
        vs.append(Variant(f'{name} fp32', peer, baseline=None))
        vs.append(Variant(f'{name} bf16', peer, bf16=True, baseline=f'{name} fp32'))
    mambavision.set_scan_backend(None)
    return vs


def scan_share(variant: Variant, x: torch.Tensor, calls: int = 3) -> float:
    """Fraction of the forward's CPU time spent inside the scan over ``calls`` calls, from torch.profiler.

    In inference the mixers run the fused kernel of ``mambavision::mixer_core`` ('mixer_core kernel'), which
    also does the convs, x_proj, dt_proj and the concatenation: it counts as scan time.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            variant(x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    scan = sum(e.cpu_time_total for e in events if e.key in ('mambavision::selective_scan', 'mixer_core kernel'))
    return scan / total


def run(args) -> str:
    variants = build_variants(args)
    base = variants[0]
    lines = []
    for bs in args.batch_sizes:
        x = torch.randn(bs, 3, 224, 224, generator=torch.Generator().manual_seed(bs))
        for v in variants:
            v.times = []
            for _ in range(args.warmup):
                v.out = v(x).float()
        interleaved_rounds(variants, x, args.repeats)
        by_name = {v.name: v for v in variants}
        block = [f'\n### batch {bs}\n',
                 '| model / scan backend / precision / mode | ms (median) | img/s | speed-up vs reference fp32 '
                 '| rel err |',
                 '|---|---:|---:|---:|---:|']
        for v in variants:
            ratio = statistics.median(b / t for b, t in zip(base.times, v.times))
            ref = by_name[v.baseline] if v.baseline else v
            err = float((v.out - ref.out).norm() / ref.out.norm())
            med = statistics.median(v.times)
            block.append(f'| {v.name} | {med * 1e3:.1f} | {bs / med:.1f} | {ratio:.2f}x | '
                         f'{"-" if ref is v else f"{err:.1e}"} |')
        block.append(f'\nlogits of the reference fp32 model: rms {float(base.out.pow(2).mean().sqrt()):.2f}')
        if args.profile:
            block.append('\nscan share of forward CPU time (torch.profiler, 3 calls each):\n')
            for v in variants:
                if v.name.startswith('mambavision_t') and 'compile' not in v.name:
                    block.append(f'- {v.name}: {scan_share(v, x):.1%}')
        print('\n'.join(block), flush=True)
        lines += block
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 16])
    parser.add_argument('--repeats', type=int, default=5, help='timed rounds (median over them)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed calls per variant and batch size')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--compile', action='store_true',
                        help='add optimize_for_inference(compile=True) variants (inductor with freezing)')
    parser.add_argument('--peers', nargs='*', default=list(PEERS), help='timm models to compare (none: --peers)')
    parser.add_argument('--profile', action='store_true', help="also report the scan's share of forward time")
    parser.add_argument('--output', help='also write the markdown report to this file')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    write_report('CPU inference, 224x224',
                 f'{args.warmup} warm-up call(s), then {args.repeats} interleaved rounds; speed-up = median of '
                 'per-round ratios; rel err = ||logits - logits_fp32|| / ||logits_fp32|| over the batch',
                 lambda: run(args), args.output)


def interleaved_rounds(variants, x: torch.Tensor, repeats: int) -> None:
    """``repeats`` rounds over ``variants`` (each with a ``times`` list), each round starting one variant later, so
    that no variant always runs first; appends each call's wall time to its variant's ``times``."""
    for r in range(repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            t0 = time.perf_counter()
            v(x)
            v.times.append(time.perf_counter() - t0)


def write_report(title: str, protocol: str, body: Callable[[], str], output: Optional[str]) -> None:
    """Print a markdown report (machine, date, command, protocol, then what ``body()`` measures, then the wall
    time), and write it to ``output`` too when given."""
    started = datetime.datetime.now(datetime.UTC)
    header = [
        f'## {title}',
        f'- machine: {machine()}',
        f'- date: {started:%Y-%m-%d %H:%M} UTC',
        f'- command: `python {" ".join(shlex.quote(a) for a in sys.argv)}`',
        f'- protocol: {protocol}',
    ]
    print('\n'.join(header), flush=True)
    report = '\n'.join(header) + '\n' + body()
    report += f'\n\ntotal wall time: {(datetime.datetime.now(datetime.UTC) - started).total_seconds():.0f} s\n'
    print(report.splitlines()[-1])
    if output:
        with open(output, 'w') as f:
            f.write(report)


if __name__ == '__main__':
    main()
