"""Every GPU check and timing in one run: scan and model correctness, inference throughput, training step.

A session lent a GPU runs, from the repository root:

    pip install --no-deps --no-build-isolation -e .
    python benchmarks/gpu.py            # about 5-7 min on an H100; --quick for a first look

and records the printed table, the card and the versions in benchmarks/RESULTS.md. Full
results go to ``$OUT/gpu_results.json`` (and the table to ``gpu_results.md``; ``$OUT``
defaults to ./out), rewritten after every measurement so that a killed run keeps what it
measured. Every measurement runs in its own try/except: a failing backend or compile is
recorded with its error and the others still run. A time budget (``--budget-s``) stops
starting measurements that would not finish in it, so one 10-minute device command holds
the whole run; what it skipped is recorded.

Sections, cheap and essential first:

1. ``scan``: each scan backend the device has (``available_scan_backends``, or ``--backends``)
   against the sequential float32 ``selective_scan_ref`` differentiated by autograd, on the same
   fresh random inputs (``--seed``, random by default, recorded): the output and the gradient of
   every input, as max |err| / max |ref|. The oracle runs on the device (its backward on the CPU
   takes minutes at 1024 tokens); ``reference on cpu`` rows check it against itself on the CPU
   where that is cheap. Shapes: (channels, tokens) of every windowed stage of every registered
   MambaVision (stage width / 2 = 160..1024 channels, window^2 = 49..1024 tokens), odd ones and
   a 12,544-token window.
2. ``model``: mambavision_t (timm init, seed 0) in float32 (TF32 off) on the device, per
   backend, against the same weights on the CPU: logits and every parameter's gradient of a
   fixed random projection of the logits, as relative L2 errors (the worst parameter named).
3. ``inference``: images/s of each model (``--models``) x backend at batch 128, 224x224,
   bf16 autocast, channels-last, under ``inference_mode``: the median of ``repeats`` batches
   timed with CUDA events after ``warmup`` batches, and the peak memory allocated; eager,
   then ``torch.compile``, and for the first model ``optimize_for_inference`` (mode ``optimize``:
   BatchNorm folded into the convs, bf16 weights, compiled with inductor's freezing). A model is
   compiled once (a ``compile`` row, run with the ``torch`` scan): the scan op picks its backend
   when it runs, so the compiled graph serves every backend through ``set_scan_backend``.
4. ``train``: one AdamW step (forward, cross-entropy, backward, step) under bf16 autocast,
   channels-last, for each backend and ``--train-models``, eager and compiled: time and peak memory.

Timings run eager (inference, then train), then compiled: the first model's inference (compile,
then optimize), the training step, the other models' inference.

``--device cpu --smoke`` runs every path on ``test_mambavision`` at 64x64 with tiny shapes
and compiles with the ``aot_eager`` backend (Dynamo and AOTAutograd, without Inductor's C++
compile, which takes minutes on a small CPU); tests/test_gpu_script.py runs it.
"""
import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import secrets
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from importlib import metadata
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import timm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import mambavision  # noqa: E402  (registers the models)
from mambavision.model import MambaVisionMixer  # noqa: E402
from mambavision.inference import optimize_for_inference  # noqa: E402
from mambavision.ops import available_scan_backends, selective_scan, selective_scan_ref, set_scan_backend  # noqa: E402
from mambavision.timing import time_calls  # noqa: E402

SCAN_TOL = {'y': 1e-4, 'grad': 1e-3}  # max |err| / max |ref|; mamba-ssm's own tests allow more for float32
MODEL_TOL = {'logits': 1e-4, 'grad': 1e-3}  # relative L2 error
# (batch, D, L, N); the last: a detection model's 112 x 112 window, few channels (the segmented Triton scan)
ODD_SCAN_SHAPES = [(3, 37, 1, 8), (3, 101, 97, 8), (1, 161, 197, 8), (2, 785, 1023, 8), (1, 16, 12544, 8)]
SMOKE_SCAN_SHAPES = [(2, 5, 7, 4), (1, 9, 1, 8), (3, 16, 49, 8)]
BACKENDS = ('mamba_ssm', 'triton', 'torch', 'reference')  # fastest first, as available_scan_backends lists them
REF_CPU = 'reference on cpu'  # scan row: the oracle run on the CPU, against itself on the device
CPU_ORACLE_MAX = 160 * 196 ** 2  # channels * tokens^2 up to which the CPU oracle is run (its backward costs that)
GRAD_NAMES = ('du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'ddelta_bias')
START = time.monotonic()  # the time budget counts from here (imports and environment included)
NEEDS_S = {'compile': 150., 'default': 20.}  # seconds of budget a measurement must have left to start


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _error(e: BaseException) -> str:
    return f'{type(e).__name__}: {str(e).strip()[:2000]}'


def _command(cmd: List[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """Card, driver, CUDA and library versions, and what the scan backends found."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
    env = dict(
        python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
        torch=torch.__version__, torch_cuda=torch.version.cuda, triton=_version('triton'), timm=timm.__version__,
        mamba_ssm=_version('mamba-ssm'), mambavision=mambavision.__version__,
        git_commit=_command(['git', '-C', root, 'rev-parse', 'HEAD']),
        git_dirty=bool(_command(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'])),
        scan_env=os.environ.get('MAMBAVISION_SCAN'),
        scan_backends_available=available_scan_backends(device.type),
    )
    try:
        import selective_scan_cuda  # noqa: F401  (mamba-ssm's extension; any failure is worth recording)
        env['selective_scan_cuda'] = 'imported'
    except Exception as e:
        env['selective_scan_cuda'] = _error(e)
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name, gpu_capability=f'{props.major}.{props.minor}', gpu_sms=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version(),
            driver=_command(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader']),
            nvcc=next((line for line in (_command(['nvcc', '--version']) or '').splitlines() if 'release' in line),
                      None))
    return env


class Recorder:
    """Runs measurements one by one, each in try/except, and rewrites the JSON after each."""

    def __init__(self, path: str, budget_s: float, device: torch.device, report: dict):
        self.path, self.budget_s, self.device, self.report = path, budget_s, device, report
        self.fatal: Optional[str] = None  # set when the CUDA context is lost: nothing more can run

    def elapsed(self) -> float:
        return time.monotonic() - START

    def run(self, section: str, row: dict, fn: Callable[[], dict], kind: str = 'default') -> dict:
        """Append ``row``, updated with ``fn()`` or with ``error`` / ``skipped``, to ``report[section]``."""
        left = self.budget_s - self.elapsed()
        if self.fatal:
            row['skipped'] = self.fatal
        elif left < NEEDS_S[kind]:
            row['skipped'] = (f'time budget: {left:.0f} s of --budget-s {self.budget_s:.0f} left, '
                              f'needs {NEEDS_S[kind]:.0f}')
        else:
            start = time.monotonic()
            try:
                row.update(fn())
            except Exception as e:
                row['error'] = _error(e)
                print(f'[{section}] {row}:\n{traceback.format_exc()}', file=sys.stderr)
                self._check_device(row)
            finally:
                set_scan_backend(None)
            # out of the handler, whose traceback held the failed call's frames and tensors: an
            # out-of-memory error leaves them and cached blocks behind
            if 'error' in row and not self.fatal:
                free_memory(self.device)
            row['wall_s'] = round(time.monotonic() - start, 3)
        return self.add(section, row)

    def add(self, section: str, row: dict) -> dict:
        """Append ``row`` to ``report[section]`` as it is, log it and save."""
        print(f'[{section} {self.elapsed():6.1f}s] ' + ', '.join(f'{k}={_short(v)}' for k, v in row.items()),
              file=sys.stderr, flush=True)
        self.report.setdefault(section, []).append(row)
        self.save()
        return row

    def _check_device(self, row: dict):
        if self.device.type != 'cuda':
            return
        try:
            torch.cuda.synchronize(self.device)
        except Exception as e:
            self.fatal = f'CUDA context lost after {row}: {_error(e)}'

    def save(self):
        self.report['elapsed_s'] = round(self.elapsed(), 1)
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(_finite(self.report), f, indent=1, allow_nan=False)
        os.replace(tmp, self.path)


def free_memory(device: torch.device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def _finite(obj):
    """``obj`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _short(v):
    return f'{v:.4g}' if isinstance(v, float) else v if not isinstance(v, dict) else '{...}'


# ----------------------------------------------------------------------------- 1. scan correctness


def scan_shapes(smoke: bool) -> List[tuple]:
    """(batch, channels, tokens, state) of the scans of every registered MambaVision's windowed stages, and odd ones."""
    if smoke:
        return SMOKE_SCAN_SHAPES
    shapes = set()
    for name in timm.list_models('mambavision*'):
        with torch.device('meta'):
            model = timm.create_model(name)
        for stage in model.stages:
            mixer = next((m for m in stage.modules() if isinstance(m, MambaVisionMixer)), None)
            if mixer is not None:
                shapes.add((2, mixer.A_log.shape[0], stage.window_size ** 2, mixer.d_state))
    return sorted(shapes, key=lambda s: (s[2], s[1])) + ODD_SCAN_SHAPES


def scan_inputs(shape: tuple, seed: int):
    """Float32 CPU (u, delta, A, B, C, D, delta_bias) as the mixer makes them, and an output gradient."""
    batch, channels, length, state = shape
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = -torch.arange(1., state + 1) * torch.exp(0.3 * r(channels, state))  # around Mamba's init -(1..N)
    inputs = (r(batch, channels, length), r(batch, channels, length) - 1., A, r(batch, state, length),
              r(batch, state, length), r(channels), 0.5 * r(channels))
    return inputs, r(batch, channels, length)


def scan_with_grads(fn: Callable, inputs, dy, device: torch.device) -> list:
    """[y, du, ddelta, dA, dB, dC, dD, ddelta_bias] of ``fn`` on ``device``, back on the CPU."""
    args = [t.to(device, copy=True).requires_grad_() for t in inputs]
    y = fn(*args, delta_softplus=True)
    y.backward(dy.to(device))
    return [t.detach().cpu() for t in [y] + [a.grad for a in args]]


def rel_max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (inf when got has non-finite values; null in the JSON)."""
    if not torch.isfinite(got).all():
        return math.inf
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.)


def check_scan(backend: str, shape: tuple, seed: int, device: torch.device, oracle: Dict[tuple, list]) -> dict:
    """``backend`` on ``device`` against ``selective_scan_ref`` differentiated by autograd on ``device``.

    ``backend`` REF_CPU: ``selective_scan_ref`` on the CPU instead, which checks the oracle itself.
    """
    inputs, dy = scan_inputs(shape, seed)
    if shape not in oracle:
        oracle[shape] = scan_with_grads(selective_scan_ref, inputs, dy, device)
    if backend == REF_CPU:
        got = scan_with_grads(selective_scan_ref, inputs, dy, torch.device('cpu'))
    else:
        got = scan_with_grads(lambda *a, **k: selective_scan(*a, **k, backend=backend), inputs, dy, device)
    errors = {name: rel_max_err(g, w) for name, g, w in zip(('y',) + GRAD_NAMES, got, oracle[shape])}
    max_bwd = max(errors[n] for n in GRAD_NAMES)
    passed = errors['y'] <= SCAN_TOL['y'] and max_bwd <= SCAN_TOL['grad']
    return dict(passed=passed, max_err_fwd=errors['y'], max_err_bwd=max_bwd, errors=errors)


# ----------------------------------------------------------------------------- 2. model correctness


@contextlib.contextmanager
def exact_float32():
    """TF32 off for matmuls and convolutions (the CPU computes in full float32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def logits_and_grads(model, x, proj):
    """Logits and every parameter's gradient of (logits * proj).sum(), on the CPU."""
    model.zero_grad(set_to_none=True)
    logits = model(x)
    (logits * proj).sum().backward()
    return logits.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters()}


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_model(backend: str, name: str, batch: int, img_size: int, device: torch.device, cache: dict) -> dict:
    if 'cpu' not in cache:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, 3, img_size, img_size, generator=g)
        proj = torch.randn(batch, model.num_classes, generator=g)
        cache['cpu'] = (model, x, proj, logits_and_grads(model, x, proj))  # auto scan backend of the CPU
    model, x, proj, (logits_ref, grads_ref) = cache['cpu']
    set_scan_backend(backend)
    with exact_float32():
        logits, grads = logits_and_grads(copy.deepcopy(model).to(device), x.to(device), proj.to(device))
    grad_errs = {n: rel_l2(grads[n], grads_ref[n]) for n in grads_ref}
    worst = max(grad_errs, key=grad_errs.get)
    logits_err = rel_l2(logits, logits_ref)
    return dict(passed=logits_err <= MODEL_TOL['logits'] and grad_errs[worst] <= MODEL_TOL['grad'],
                logits_rel_err=logits_err, grad_max_rel_err=grad_errs[worst], grad_worst_param=worst,
                grad_median_rel_err=statistics.median(grad_errs.values()))


# ----------------------------------------------------------------------------- 3-4. timings


def measure(fn: Callable[[], object], warmup: int, repeats: int, batch: int, device: torch.device) -> dict:
    """Median / min / max ms per call, images/s and peak memory of ``fn`` after ``warmup`` calls."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    times = time_calls(fn, warmup, repeats, device)
    median = statistics.median(times)
    out = dict(ms=1e3 * median, ms_min=1e3 * min(times), ms_max=1e3 * max(times), img_per_s=batch / median,
               warmup=warmup, repeats=repeats, peak_mem_gib=None)
    if device.type == 'cuda':
        out['peak_mem_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


def build(name: str, device: torch.device, train: bool):
    torch.manual_seed(0)
    with device:
        model = timm.create_model(name)
    return model.train(train).to(memory_format=torch.channels_last)


def inference_fn(model, batch: int, img_size: int, device: torch.device) -> Callable[[], object]:
    x = torch.randn(batch, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            return model(x)
    return step


def train_fn(model, params, batch: int, img_size: int, device: torch.device) -> Callable[[], object]:
    x = torch.randn(batch, 3, img_size, img_size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=device.type == 'cuda')

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def first_call(fn: Callable[[], object], device: torch.device) -> dict:
    """Seconds of one call of ``fn`` (the compile, for a fresh torch.compile), synchronised."""
    start = time.perf_counter()
    set_scan_backend('torch')
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return dict(compile_s=time.perf_counter() - start)


def timing_section(rec: Recorder, section: str, names: List[str], backends: List[str], mode: str, s: dict):
    """Rows of ``section`` ('inference' or 'train') for every model x backend.

    ``mode``: 'eager', 'compile' (torch.compile of the model) or, for inference, 'optimize'
    (``optimize_for_inference``: BatchNorm folded, bf16 weights, compiled with inductor's freezing).
    """
    train = section == 'train'
    warmup, repeats = (s['train_warmup'], s['train_repeats']) if train else (s['warmup'], s['repeats'])
    device, batch, img_size = rec.device, s['batch_size'], s['img_size']
    for name in names:
        torch._dynamo.reset()  # the variants share MambaVision.forward: keep their compiled code apart
        base = dict(model=name, mode=mode, batch=batch, img_size=img_size)
        try:
            model = build(name, device, train)
            params = list(model.parameters())
            if mode == 'compile':
                model = torch.compile(model, backend=s['compile_backend'])
            elif mode == 'optimize':
                model = optimize_for_inference(model, torch.bfloat16, compile=True,
                                               compile_options=dict(backend=s['compile_backend']))
            step = (train_fn(model, params, batch, img_size, device) if train
                    else inference_fn(model, batch, img_size, device))
        except Exception as e:  # building the model or its input failed: every backend's row says why
            step, error = None, _error(e)
        if mode != 'eager' and step is not None:
            row = rec.run('compile', dict(base, section=section, compile_backend=s['compile_backend']),
                          lambda: first_call(step, device), kind='compile')
            if 'compile_s' not in row:
                error = f"torch.compile did not run: {row.get('error') or row.get('skipped')}"
                step = None
        for backend in backends:
            row = dict(base, backend=backend)
            if step is None:
                rec.add(section, dict(row, error=error))
                continue

            def timed(backend=backend):
                set_scan_backend(backend)
                for p in params:  # a failed training step leaves gradients the next step would add to
                    p.grad = None
                return measure(step, warmup, repeats, batch, device)
            rec.run(section, row, timed)
        model = params = step = None
        free_memory(device)


# ----------------------------------------------------------------------------- table


def _cell(row: dict, value: str) -> str:
    if 'error' in row:
        return 'error'
    if 'skipped' in row:
        return 'skipped'
    return value


def markdown(report: dict) -> str:
    """The short summary: correctness counts, then throughput and training tables."""
    lines = []
    for section in ('scan', 'model'):
        rows = report.get(section, [])
        ok = sum(bool(r.get('passed')) for r in rows)
        worst = max((r.get('max_err_bwd', r.get('grad_max_rel_err', 0.)) for r in rows if 'passed' in r), default=0.)
        failed = sum('error' in r for r in rows), sum('skipped' in r for r in rows)
        lines.append(f'- {section} correctness: {ok}/{len(rows)} rows pass, {failed[0]} errors, {failed[1]} skipped '
                     f'(worst gradient error {worst:.2e})')
    for r in report.get('compile', []):
        what = f"{r['compile_s']:.0f} s" if 'compile_s' in r else r.get('error') or r.get('skipped')
        lines.append(f"- compile {r['model']} ({r['section']}): {what}")
    backends = report['settings']['backends']
    for section, unit in (('inference', 'img/s'), ('train', 'ms/step')):
        rows = report.get(section, [])
        if not rows:
            continue
        lines += ['', f'{section} ({unit}, peak GiB), batch {rows[0]["batch"]} at {rows[0]["img_size"]}px, bf16, '
                      f'channels-last', '', '| model | mode | ' + ' | '.join(backends) + ' |',
                  '|---|---|' + '---|' * len(backends)]
        for key in dict.fromkeys((r['model'], r['mode']) for r in rows):
            cells = []
            for b in backends:
                r = next((r for r in rows if (r['model'], r['mode'], r['backend']) == (*key, b)), None)
                if r is None:
                    cells.append('')
                    continue
                value = r.get('img_per_s') if section == 'inference' else r.get('ms')
                mem = '' if r.get('peak_mem_gib') is None else f", {r['peak_mem_gib']:.1f}"
                cells.append(_cell(r, f'{value:.1f}{mem}' if value is not None else ''))
            lines.append(f'| {key[0]} | {key[1]} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    p.add_argument('--smoke', action='store_true',
                   help='tiny everything (test_mambavision at 64x64, batch 2, aot_eager compile): proves the paths')
    p.add_argument('--quick', action='store_true', help='fewer warm-up and timed repeats (compiles take as long)')
    p.add_argument('--models', help='comma-separated (default mambavision_t,mambavision_s,mambavision_b)')
    p.add_argument('--train-models', help='comma-separated models for the training step (default mambavision_t)')
    p.add_argument('--backends', help=f"comma-separated scan backends, of {', '.join(BACKENDS)} "
                                      '(default all; those the device lacks are recorded as skipped)')
    p.add_argument('--batch-size', type=int, help='default 128 (smoke 2)')
    p.add_argument('--img-size', type=int, help='default 224 (smoke 64)')
    p.add_argument('--no-compile', action='store_true', help='skip the torch.compile rows')
    p.add_argument('--compile-backend', help='torch.compile backend (default inductor; smoke aot_eager)')
    p.add_argument('--seed', type=int, help='seed of the scan inputs (default random, recorded)')
    p.add_argument('--budget-s', type=float, default=500.,
                   help='seconds from the start after which no measurement starts (a compile needs '
                        f"{NEEDS_S['compile']:.0f} s left, others {NEEDS_S['default']:.0f} s; default 500)")
    p.add_argument('--out', default=os.environ.get('OUT') or 'out', help='output folder (default $OUT, else ./out)')
    args = p.parse_args(argv)
    known = set(timm.list_models('mambavision*')) | {'test_mambavision'}
    for option in ('models', 'train_models'):
        value = getattr(args, option)
        bad = [m for m in (value or '').split(',') if value and m not in known]
        if bad:
            p.error(f"--{option.replace('_', '-')}: unknown model {', '.join(bad)}; expected some of "
                    f"{', '.join(sorted(known))}")
    bad = [b for b in (args.backends or '').split(',') if args.backends and b not in BACKENDS]
    if bad:
        p.error(f"--backends: unknown {', '.join(bad)}; expected some of {', '.join(BACKENDS)}")
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: PyTorch sees no CUDA device here (use --device cpu --smoke to test the script)')
    return args


def settings(args, device: torch.device) -> dict:
    """Every choice the run makes, defaults resolved (recorded in the JSON)."""
    smoke, quick = args.smoke, args.quick
    split = lambda v, default: v.split(',') if v else default  # noqa: E731
    return dict(
        device=device.type, smoke=smoke, quick=quick,
        models=split(args.models, ['test_mambavision'] if smoke else
                     ['mambavision_t', 'mambavision_s', 'mambavision_b']),
        train_models=split(args.train_models, ['test_mambavision'] if smoke else ['mambavision_t']),
        backends=split(args.backends, list(BACKENDS) if device.type == 'cuda' else available_scan_backends('cpu')),
        check_model='test_mambavision' if smoke else 'mambavision_t', check_batch=2,
        check_img_size=64 if smoke else 224,
        batch_size=args.batch_size or (2 if smoke else 128), img_size=args.img_size or (64 if smoke else 224),
        warmup=1 if smoke else 2 if quick else 3, repeats=2 if smoke else 5 if quick else 10,
        train_warmup=1 if smoke else 2 if quick else 3, train_repeats=2 if smoke else 3 if quick else 8,
        compile=not args.no_compile, compile_backend=args.compile_backend or ('aot_eager' if smoke else 'inductor'),
        seed=args.seed if args.seed is not None else secrets.randbelow(2 ** 31),
        budget_s=args.budget_s, cudnn_benchmark=device.type == 'cuda', cpu_threads=torch.get_num_threads(),
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke and device.type == 'cpu':
        torch.set_num_threads(1)  # on a shared small CPU, OpenMP barriers stall whenever a core is taken
    s = settings(args, device)
    report = dict(
        command='python ' + shlex.join(sys.argv if argv is None else ['benchmarks/gpu.py', *argv]),
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        env=environment(device), settings=s, skipped=[], finished=False)
    rec = Recorder(os.path.join(args.out, 'gpu_results.json'), s['budget_s'], device, report)
    available = report['env']['scan_backends_available']
    for b in s['backends']:
        if b not in available:
            why = (f"selective_scan_cuda: {report['env']['selective_scan_cuda']} (benchmarks/build_mamba_ssm.sh "
                   'builds it)' if b == 'mamba_ssm' and device.type == 'cuda' else
                   f"available on {device.type} here: {', '.join(available)}")
            report['skipped'].append(dict(backend=b, reason=f'not available: {why}'))
    s['backends'] = backends = [b for b in s['backends'] if b in available]

    oracle = {}
    for i, shape in enumerate(scan_shapes(s['smoke'])):
        cpu_check = [REF_CPU] if shape[1] * shape[2] ** 2 <= CPU_ORACLE_MAX else []
        for backend in backends + cpu_check:
            row = dict(backend=backend, batch=shape[0], channels=shape[1], length=shape[2], state=shape[3])
            rec.run('scan', row, lambda: check_scan(backend, shape, s['seed'] + i, device, oracle))
        oracle.pop(shape, None)
    cache = {}
    for backend in backends:
        rec.run('model', dict(backend=backend, model=s['check_model'], batch=s['check_batch'],
                              img_size=s['check_img_size']),
                lambda: check_model(backend, s['check_model'], s['check_batch'], s['check_img_size'], device, cache))
    cache.clear()

    torch.backends.cudnn.benchmark = s['cudnn_benchmark']
    models, train_models = s['models'], s['train_models']
    jobs = [('inference', models, 'eager'), ('train', train_models, 'eager')]
    if s['compile']:  # the larger models' compiled inference last: the first thing a short budget drops
        jobs += [('inference', models[:1], 'compile'), ('inference', models[:1], 'optimize'),
                 ('train', train_models, 'compile'), ('inference', models[1:], 'compile')]
    for section, names, mode in jobs:
        timing_section(rec, section, names, backends, mode, s)
    report['finished'] = True
    rec.save()
    table = markdown(report)
    with open(os.path.join(args.out, 'gpu_results.md'), 'w') as f:
        f.write(f"{report['command']}\n\n{table}\n")
    print(f"\nresults: {rec.path} ({report['elapsed_s']:.0f} s; {report['env'].get('gpu', device.type)}, "
          f"torch {torch.__version__}, triton {report['env']['triton']}, mamba-ssm {report['env']['mamba_ssm']})\n")
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
