"""MambaVision-T against ConvNeXt-T and Swin-T on a CPU, each on its best path and on float32 eager.

Best path, the same treatment for every model: channels_last, BatchNorm folded (ours; the peers
have none before a conv), conv/linear weights stored in bf16 and run under bf16 autocast, then
``torch.compile`` with inductor's freezing and ``cpu_compile_options`` (C++ wrapper; on AMX,
inductor's GEMM templates), i.e. ``optimize_for_inference(bf16, compile=True)`` for MambaVision
and ``InferenceModel`` around the same rewrites for timm's peers. float32 eager
is the model as created, under ``torch.inference_mode``.

Every variant runs in this one process on the same input; variants are interleaved within each
round (the order rotates per round) after ``--warmup`` untimed calls (compilation happens
there). Reported: median latency, images/s, and the speed against the first peer's variant of
the same kind (best path against best path, eager against eager) as the median of per-round
ratios, which cancels load drifting over the run. Weights: ``cpu.realistic_init`` (O(1)
logits); ``rel err`` is the relative L2 distance of the logits to the model's float32 eager run.
``--op-path`` adds MambaVision variants whose mixers run the scan op on (B, C, L) tensors (the
training path, and the inference path before ``ops.mixer_cpu``'s fused kernel), for a before/after;
``--channels-last`` adds every model in float32 eager with its weights and input in channels_last
(timm's ``--channels-last``, a user's one-line change), and MambaVision's float32 eager path with its
BatchNorms folded as well (``optimize_for_inference(model, None)``, compared with the peers' channels_last
rows: they have no BatchNorm to fold); ``--option-menu`` adds every model's best
path compiled without ``cpu_compile_options`` (the
best path before them) and with the C++ wrapper alone, so that each model's best over the same
menu can be read off; ``--autotune`` adds every best path compiled with ``mode='max-autotune'``.
Each row is compared with the first peer's row of the same kind (like with like). ``--eager-only``
times the float32 eager paths alone: in a process that also holds the compiled variants, the
eager rows come out slower and less repeatable (seen, not explained). ``--copies K`` builds every
variant K times over (separate weights in memory) and times the K copies back to back in each
round: on the 2-core machine of the README, identical copies of one model differed by up to 8%
at batch 1 (a one-off measurement; where their weights landed in memory), so one copy per model
can decide a 5% comparison.

    python benchmarks/cpu_peers.py --output peers.md     # about 10-15 min on 2 idle cores (6 compilations)
"""
import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

import timm

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from cpu import interleaved_rounds, realistic_init, write_report  # noqa: E402
import mambavision  # noqa: E402, F401  (registers the models)
from mambavision.inference import InferenceModel, optimize_for_inference  # noqa: E402

MODELS = ('mambavision_t', 'convnext_tiny', 'swin_tiny_patch4_window7_224')


def best_path(model: nn.Module, **compile_options) -> nn.Module:
    """The fastest inference treatment: ``optimize_for_inference`` for ours, its same rewrites for a timm peer."""
    if isinstance(model, mambavision.MambaVision):
        return optimize_for_inference(model, torch.bfloat16, compile=True, compile_options=compile_options)
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.to(torch.bfloat16)
    return InferenceModel(model, torch.bfloat16, compile=True, compile_options=compile_options)


def channels_last(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` with its weights in channels_last, called on channels_last input."""
    model = model.to(memory_format=torch.channels_last)
    return lambda x: model(x.contiguous(memory_format=torch.channels_last))


def op_path(model: nn.Module) -> nn.Module:
    """``model`` with every mixer on the scan op's path (no fused kernel), as during training."""
    for m in model.modules():
        if isinstance(m, mambavision.MambaVisionMixer):
            m._fused_applies = lambda x: False
    return model


BEST = 'best path (bf16, compiled)'
FP32_OPTIMIZED = 'fp32 eager, BatchNorm folded + channels_last'
OPTION_MENU = {'best path, no CPU options': {}, 'best path, C++ wrapper only': {'cpp_wrapper': True}}


class Variant:
    """One way of running one model; ``compare_as``: the kind of the peer's row it is compared with."""

    def __init__(self, model_name: str, kind: str, fns: List[Callable[[torch.Tensor], torch.Tensor]],
                 compare_as: Optional[str] = None):
        self.model_name, self.kind, self.fns, self.compare_as = model_name, kind, fns, compare_as or kind
        self.times: List[float] = []  # per round: all copies, back to back
        self.out = None

    @property
    def name(self) -> str:
        return f'{self.model_name} {self.kind}'

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Every copy once on ``x``; the first copy's output."""
        with torch.inference_mode():
            return [fn(x) for fn in self.fns][0]


def build_variants(names, with_op_path: bool = False, autotune: bool = False,
                   option_menu: bool = False, eager_only: bool = False, copies: int = 1,
                   with_channels_last: bool = False) -> List[Variant]:
    variants = []
    for name in names:
        model = realistic_init(timm.create_model(name))
        ours_op_path = with_op_path and isinstance(model, mambavision.MambaVision)
        # (kind, how to make one copy from the model, the kind of the peer's row it is compared with)
        specs: List[Tuple[str, Callable[[nn.Module], Callable], Optional[str]]] = [('fp32 eager', lambda m: m, None)]
        if with_channels_last:
            specs.append(('fp32 eager, channels_last', channels_last, None))
            if isinstance(model, mambavision.MambaVision):  # the peers' same treatment is channels_last alone
                specs.append((FP32_OPTIMIZED, lambda m: optimize_for_inference(m, None), 'fp32 eager, channels_last'))
        if ours_op_path:
            specs.append(('fp32 eager, op path', op_path, 'fp32 eager'))
        if not eager_only:
            specs.append((BEST, best_path, None))
            for kind, options in OPTION_MENU.items() if option_menu else ():
                specs.append((kind, lambda m, options=options: best_path(m, options=options), None))
            if autotune:
                specs.append(('best path, max-autotune', lambda m: best_path(m, mode='max-autotune'), None))
            if ours_op_path:
                specs.append(('best path, op path', lambda m: best_path(op_path(m)), BEST))
        variants += [Variant(name, kind, [make(copy.deepcopy(model)) for _ in range(copies)], compare_as)
                     for kind, make, compare_as in specs]
    return variants


def run(args) -> str:
    variants = build_variants(args.models, args.op_path, args.autotune, args.option_menu, args.eager_only,
                              args.copies, args.channels_last)
    lines = []
    for bs in args.batch_sizes:
        x = torch.randn(bs, 3, 224, 224, generator=torch.Generator().manual_seed(bs))
        for v in variants:
            v.times = []
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                v.out = v(x).float()
            print(f'batch {bs}: {v.name} warm-up {time.perf_counter() - t0:.1f} s', file=sys.stderr, flush=True)
        interleaved_rounds(variants, x, args.repeats)
        eager = {v.model_name: v for v in variants if v.kind == 'fp32 eager'}
        block = [f'\n### batch {bs}\n',
                 f'| model | path | ms (median) | img/s | speed vs {args.models[1]} same path | rel err |',
                 '|---|---|---:|---:|---:|---:|']
        for v in variants:
            peer = next(p for p in variants if p.model_name == args.models[1] and p.kind == v.compare_as)
            ratio = statistics.median(p / t for p, t in zip(peer.times, v.times))
            ref = eager[v.model_name]
            err = float((v.out - ref.out).norm() / ref.out.norm())
            med = statistics.median(v.times) / args.copies
            block.append(f'| {v.model_name} | {v.kind} | {med * 1e3:.1f} | {bs / med:.1f} | {ratio:.2f}x | '
                         f'{"-" if ref is v else f"{err:.1e}"} |')
        print('\n'.join(block), flush=True)
        lines += block
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(MODELS),
                        help='timm model names; the second is the one the others are compared with')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 16])
    parser.add_argument('--repeats', type=int, default=15, help='timed rounds (median over them)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed calls per variant and batch size')
    parser.add_argument('--copies', type=int, default=1,
                        help='independent copies of every variant, timed back to back in each round (ms per copy)')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)')
    parser.add_argument('--op-path', action='store_true',
                        help="also time MambaVision's mixers on the scan op's path (before/after the fused kernel)")
    parser.add_argument('--option-menu', action='store_true',
                        help='also time each best path without the CPU compile options and with the C++ wrapper only')
    parser.add_argument('--channels-last', action='store_true',
                        help='also time each model in float32 eager with channels_last weights and input, and '
                             'MambaVision with its BatchNorms folded too (optimize_for_inference(model, None))')
    parser.add_argument('--eager-only', action='store_true',
                        help='time the float32 eager paths alone, in a process without compiled models')
    parser.add_argument('--autotune', action='store_true',
                        help="also time each best path compiled with mode='max-autotune' (inductor's C++ GEMMs)")
    parser.add_argument('--output', help='also write the markdown report to this file')
    args = parser.parse_args()
    if len(args.models) < 2:
        parser.error('--models needs at least two names (the second is the comparison)')
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.copies < 1:
        parser.error(f'--copies must be at least 1, got {args.copies}')
    write_report('CPU inference against peers, 224x224',
                 f'{args.warmup} warm-up call(s), then {args.repeats} interleaved rounds of {args.copies} '
                 'copy/copies of each variant; speed = median of '
                 'per-round ratios; rel err = ||logits - logits_fp32_eager|| / ||logits_fp32_eager|| over the batch',
                 lambda: run(args), args.output)


if __name__ == '__main__':
    main()
