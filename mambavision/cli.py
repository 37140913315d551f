"""The ``mambavision`` command line: ``mambavision COMMAND [options]`` (also ``python -m mambavision``).

Commands come from the ``COMMANDS`` table, ``name -> (module, one-line help)``. The
module of a command defines two functions:

    add_arguments_<name>(parser: argparse.ArgumentParser) -> None
    run_<name>(args: argparse.Namespace) -> int        # the exit status

Adding a command is one line in ``COMMANDS``. A command's module is imported only
when that command runs (or its ``--help`` is asked for), so ``mambavision info``
never imports the trainer or the exporter.

Any exception a command raises is printed as one line,
``mambavision <command>: error: <message>``, with a non-zero exit status; ``--debug``
(or the environment variable ``MAMBAVISION_DEBUG=1``) shows the traceback instead.
Raise ``CliError`` for expected failures (bad input): its message is printed as is.
"""
import argparse
import contextlib
import difflib
import functools
import importlib
import json
import os
import platform
import statistics
import sys
from importlib import metadata
from typing import Optional, Sequence

__all__ = ['main', 'COMMANDS', 'CliError', 'check_model_name', 'model_complexity']

COMMANDS = {
    'info': ('mambavision.cli', 'show versions, device, scan backends and the models with their size and cost'),
    'predict': ('mambavision.cli', 'classify images (ImageNet-1k top-k) with a pretrained model'),
    'benchmark': ('mambavision.cli', 'measure inference throughput and latency'),
    'train': ('mambavision.train', 'train or fine-tune on an image dataset, one process or many under torchrun'),
    'validate': ('mambavision.train', 'top-1, top-5 and loss of a checkpoint or the published weights '
                 '(--task seg: ADE20K mIoU; --task det: COCO box and mask AP)'),
    'export': ('mambavision.export', 'write a model as an ONNX file (dynamic batch and image size) and check it in onnxruntime'),
    'segment': ('mambavision.dense.cli', 'semantic segmentation (ADE20K UPerNet): palette label maps and overlays'),
    'detect': ('mambavision.dense.cli', 'instance segmentation (COCO Cascade Mask R-CNN): pictures and COCO results JSON'),
}

DEFAULT_MODEL = 'mambavision_t.nv_in1k'
PREDICT_BATCH_SIZE = 16
MODEL_FAMILY = ['mambavision*', 'test_mambavision']


class CliError(Exception):
    """An expected failure (bad input, missing file): printed as one line without a traceback."""


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _debug_from_env() -> bool:
    return os.environ.get('MAMBAVISION_DEBUG', '').strip().lower() in ('1', 'true', 'yes', 'on')


# ---------------------------------------------------------------------------------------------
# shared helpers


def check_model_name(name: str) -> str:
    """``name`` when it is a MambaVision model (``arch`` or ``arch.tag``), else ``CliError`` with close matches."""
    import timm
    import mambavision  # noqa: F401  (registers the models)

    known = timm.list_models(MODEL_FAMILY) + timm.list_models(MODEL_FAMILY, pretrained=True)
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = (f'did you mean {", ".join(close)}?' if close
            else f'expected one of {", ".join(timm.list_models("mambavision*"))}')
    raise CliError(f'unknown model {name!r}; {hint} (`mambavision info` lists them)')


@functools.lru_cache(maxsize=None)
def model_complexity(name: str):
    """(parameters, multiply-accumulates per image) of model ``name`` at its native input size.

    Model and input live on the 'meta' device (shapes only: no memory, no compute), and
    ``torch.utils.flop_counter.FlopCounterMode`` counts the convolutions and matmuls,
    attention included; elementwise work and the scan's recurrence are not counted.
    """
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    import mambavision  # noqa: F401

    with torch.device('meta'):
        model = timm.create_model(name).eval()
        x = torch.empty(1, *model.pretrained_cfg['input_size'])
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def _dist_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _resolve_device(name: Optional[str]):
    import torch

    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise CliError('--device cuda: no CUDA device is available to this PyTorch (use --device cpu)')
    return torch.device(name)


def amp_dtype(amp: Optional[str]):
    """The torch dtype of ``--amp`` (bf16 or fp16), or None."""
    import torch

    return {None: None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[amp]


def amp_autocast(device_type: str, amp: Optional[str]):
    """The context for ``--amp``: autocast to bf16 or fp16, or nothing when ``amp`` is None."""
    import torch

    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=amp_dtype(amp))


def _int_at_least(minimum: int):
    """argparse ``type``: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f'expected an integer >= {minimum}, got {text!r}')
        return value
    return parse


# ---------------------------------------------------------------------------------------------
# info


def add_arguments_info(parser: argparse.ArgumentParser):
    parser.add_argument('--json', action='store_true', help='print one JSON object')


def run_info(args) -> int:
    import timm
    import torch
    import mambavision
    from mambavision.ops import available_scan_backends, cpu_scan, resolve_scan_backend

    def backend(device_type):
        try:
            return resolve_scan_backend(device_type)
        except RuntimeError as e:  # a forced backend ($MAMBAVISION_SCAN) that cannot run there
            return f'error: {_one_line(e)}'

    cuda = torch.cuda.is_available()
    devices = {'cpu': {'threads': torch.get_num_threads(), 'scan_backend': backend('cpu'),
                       'scan_backends_available': available_scan_backends('cpu'),
                       'cpu_kernel': 'built' if cpu_scan.load() is not None else f'not built: {cpu_scan.build_error}'}}
    if cuda:
        devices['cuda'] = {'name': torch.cuda.get_device_name(0), 'count': torch.cuda.device_count(),
                           'scan_backend': backend('cuda'), 'scan_backends_available': available_scan_backends('cuda')}
        if devices['cuda']['scan_backend'] == 'triton':  # run it once: a Triton that cannot run here shows now
            from mambavision.ops.selective_scan import probe_scan_backend
            devices['cuda']['triton_failures'] = probe_scan_backend('cuda')
    models = []
    for name in timm.list_models('mambavision*'):
        params, macs = model_complexity(name)
        tags = [n.split('.', 1)[1] for n in timm.list_models(name, pretrained=True)]
        cfg = timm.models.get_pretrained_cfg(name)
        models.append(dict(name=name, params=params, input_size=list(cfg.input_size), gmacs=round(macs / 1e9, 3),
                           pretrained_tags=tags, weights_license=cfg.license))
    models.sort(key=lambda m: (m['params'], m['input_size']))
    report = dict(
        versions=dict(mambavision=mambavision.__version__, torch=torch.__version__, timm=timm.__version__,
                      python=platform.python_version(), mamba_ssm=_dist_version('mamba-ssm'),
                      triton=_dist_version('triton'), cuda=torch.version.cuda),
        device='cuda' if cuda else 'cpu', devices=devices, models=models,
        gmacs_note='GMACs: 1e9 multiply-accumulates per image at input_size (what the paper calls FLOPs; '
                   'GFLOPs = 2 x GMACs), counted by torch FlopCounterMode, attention matmuls included')
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    v = report['versions']
    print(f"mambavision {v['mambavision']}  (python {v['python']}, torch {v['torch']}, timm {v['timm']}, "
          f"CUDA {v['cuda'] or 'none'}, mamba-ssm {v['mamba_ssm'] or 'not installed'}, "
          f"triton {v['triton'] or 'not installed'})")
    for device_type, d in devices.items():
        what = d['name'] if device_type == 'cuda' else f"{d['threads']} threads"
        kernel = f"; cpu_kernel {d['cpu_kernel']}" if d.get('cpu_kernel', 'built') != 'built' else ''
        print(f"{device_type:5s} {what}: scan backend {d['scan_backend']} "
              f"(available: {', '.join(d['scan_backends_available'])}{kernel})")
        for config, error in d.get('triton_failures', {}).items():
            print(f"      triton failed at its first call, the torch scan runs instead: {error} ({config})")
    if not cuda:
        print('cuda  not available')
    print(f"\n{'model':20s} {'params':>9s} {'input':>7s} {'GMACs':>8s}  pretrained tags")
    for m in models:
        print(f"{m['name']:20s} {m['params'] / 1e6:8.1f}M {m['input_size'][-1]:7d} {m['gmacs']:8.2f}  "
              f"{', '.join(m['pretrained_tags'])}")
    print(f"\n{report['gmacs_note']}.")
    print(f"Licences: the published weights {', '.join(sorted({m['weights_license'] for m in models}))} "
          f"(non-commercial), this library's code Apache-2.0.")
    return 0


# ---------------------------------------------------------------------------------------------
# predict


def add_arguments_predict(parser: argparse.ArgumentParser):
    parser.add_argument('images', nargs='*', metavar='IMAGE',
                        help='image files (default: a sample image shipped with the package)')
    parser.add_argument('--model', default=DEFAULT_MODEL,
                        help=f'model name, optionally with a weight tag (default {DEFAULT_MODEL})')
    parser.add_argument('--checkpoint', metavar='PATH',
                        help='local weight file (.pth.tar as published, .pth, .safetensors) instead of the hub')
    parser.add_argument('--topk', type=_int_at_least(1), default=5, metavar='K',
                        help='classes shown per image (default 5)')
    parser.add_argument('--require-weights', action='store_true',
                        help='fail when pretrained weights cannot be had, instead of predicting with random weights')


def _sample_image():
    from importlib.resources import files
    return files('mambavision') / 'assets' / 'sample.jpg'


def _open_image(path, decode: bool = True):
    """The RGB image at ``path``; with ``decode=False`` only check that it is one (reads the header)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise CliError(f'image not found: {path}')
    if os.path.isdir(path):
        raise CliError(f'{path} is a directory, expected an image file')
    try:
        with Image.open(path) as image:
            return image.convert('RGB') if decode else None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise CliError(f'cannot read {path} as an image ({_one_line(e)})') from None


def create_model_with_weights(command: str, name: str, checkpoint: Optional[str], require_weights: bool,
                              hint: str, random_weights: bool = False):
    """Model ``name`` with the weights asked for: ``checkpoint`` (a local file) when given, else the
    published ones (hub or local cache). When those cannot be had, or none are published, or
    ``random_weights`` is set: random weights announced in one line on stderr, or, with
    ``require_weights``, a ``CliError`` saying why (``hint`` tells the way out)."""
    import timm

    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise CliError(f'checkpoint not found: {checkpoint}')
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
    cfg = timm.models.get_pretrained_cfg(name)
    if random_weights:
        reason = 'random weights asked for'
    elif cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        reason = f'no pretrained weights are published for {name}'
    else:
        try:
            model = timm.create_model(name, pretrained=True)
        except (RuntimeError, OSError) as e:  # offline, download refused, unreadable cached file
            reason = _one_line(e)
        else:
            print(f'mambavision {command}: published weights of {model.pretrained_cfg["architecture"]}.'
                  f'{model.pretrained_cfg["tag"]}, licence {cfg.license}', file=sys.stderr)
            return model
    if require_weights and not random_weights:
        raise CliError(f'{reason} ({hint})')
    print(f'mambavision {command}: warning: {reason}; using RANDOM weights ({hint})', file=sys.stderr)
    return timm.create_model(name)


def run_predict(args) -> int:
    import torch
    from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_model_data_config

    check_model_name(args.model)
    paths = args.images or [str(_sample_image())]
    for path in paths:  # fail before building the model
        _open_image(path, decode=False)
    model = create_model_with_weights(
        'predict', args.model, args.checkpoint, args.require_weights,
        '--checkpoint PATH loads a local file; --require-weights refuses random weights').eval()
    transform = create_transform(**resolve_model_data_config(model))
    subset = infer_imagenet_subset(model)
    labels = ImageNetInfo(subset) if subset else None
    for start in range(0, len(paths), PREDICT_BATCH_SIZE):
        batch = paths[start:start + PREDICT_BATCH_SIZE]
        with torch.inference_mode():
            probs = model(torch.stack([transform(_open_image(p)) for p in batch])).float().softmax(dim=-1)
        top_p, top_i = probs.topk(min(args.topk, probs.shape[-1]), dim=-1)
        for path, ps, idx in zip(batch, top_p.tolist(), top_i.tolist()):
            print(path)
            for rank, (p, i) in enumerate(zip(ps, idx), 1):
                name = labels.index_to_description(i) if labels else f'class {i}'
                print(f'  {rank}. {100 * p:6.2f}%  {name} ({i})')
    return 0


# ---------------------------------------------------------------------------------------------
# benchmark


def add_arguments_benchmark(parser: argparse.ArgumentParser):
    parser.add_argument('--model', default='mambavision_t', help='model name (default mambavision_t)')
    parser.add_argument('--batch-size', type=_int_at_least(1), help='images per batch (default 128 on cuda, 8 on cpu)')
    parser.add_argument('--img-size', type=_int_at_least(1), help="square input side (default the model's native size)")
    parser.add_argument('--device', choices=('cpu', 'cuda'), help='default cuda when available')
    parser.add_argument('--amp', choices=('bf16', 'fp16'), help='autocast to this dtype (default float32)')
    parser.add_argument('--channels-last', action='store_true', help='channels-last memory format')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (warm-up includes compiling)')
    parser.add_argument('--optimize', action='store_true',
                        help='run mambavision.optimize_for_inference: BatchNorm folded, channels-last, weights in the '
                             '--amp dtype; with --compile, inductor with freezing (the fastest CPU path)')
    parser.add_argument('--warmup', type=_int_at_least(0), default=5, metavar='N',
                        help='untimed batches first (default 5)')
    parser.add_argument('--repeats', type=_int_at_least(1), default=20, metavar='N',
                        help='timed batches; the median is reported (default 20)')
    parser.add_argument('--json', action='store_true', help='print one JSON object')


def run_benchmark(args) -> int:

    import timm
    import torch
    from tqdm import tqdm
    from mambavision.ops import resolve_scan_backend
    from mambavision.timing import time_calls

    check_model_name(args.model)
    device = _resolve_device(args.device)
    batch_size = args.batch_size or (128 if device.type == 'cuda' else 8)
    with device:  # initialise on the device: quick even for the 740M-parameter models on a GPU
        model = timm.create_model(args.model).eval()
    img_size = args.img_size or model.pretrained_cfg['input_size'][-1]
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    if args.optimize:
        from mambavision.inference import optimize_for_inference
        model = optimize_for_inference(model, amp_dtype(args.amp), compile=args.compile)
    else:
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if args.compile:
            model = torch.compile(model)
    progress = functools.partial(tqdm, desc=f'benchmark {args.model}', unit='batch', file=sys.stderr, leave=False,
                                 disable=None)
    with torch.inference_mode(), amp_autocast(device.type, args.amp):
        times = time_calls(lambda: model(x), args.warmup, args.repeats, device, progress)
    latency = statistics.median(times)
    result = dict(
        model=args.model, device=device.type,
        device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine(),
        threads=torch.get_num_threads(), scan_backend=resolve_scan_backend(device.type),
        batch_size=batch_size, img_size=img_size, amp=args.amp, channels_last=args.channels_last or args.optimize,
        compile=args.compile, optimize=args.optimize,
        warmup=args.warmup, repeats=args.repeats,
        latency_ms=1e3 * latency, latency_ms_min=1e3 * min(times), latency_ms_max=1e3 * max(times),
        img_per_s=batch_size / latency, torch=torch.__version__,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    where = result['device_name'] if device.type == 'cuda' else f"{result['device_name']}, {result['threads']} threads"
    print(f"{args.model} on {device.type} ({where}), scan {result['scan_backend']}: "
          f"batch {batch_size} x {img_size}x{img_size}, {args.amp or 'fp32'}"
          f"{', channels-last' if result['channels_last'] else ''}{', compiled' if args.compile else ''}"
          f"{', optimize_for_inference' if args.optimize else ''}")
    print(f"  {result['img_per_s']:.1f} img/s, {result['latency_ms']:.2f} ms per batch "
          f"(median of {args.repeats}; min {result['latency_ms_min']:.2f}, max {result['latency_ms_max']:.2f})")
    return 0


# ---------------------------------------------------------------------------------------------
# entry point


def _build_parser(command: Optional[str]) -> argparse.ArgumentParser:
    """The parser, with the arguments of ``command`` only (its module is imported; the others are not)."""
    import mambavision

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                       help='show the full traceback on errors (also MAMBAVISION_DEBUG=1)')
    parser = argparse.ArgumentParser(
        prog='mambavision', parents=[debug],
        description='MambaVision backbones for PyTorch and timm.')
    parser.add_argument('--version', action='version', version=f'mambavision {mambavision.__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, (module, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help, parents=[debug])
        if name == command:
            getattr(importlib.import_module(module), f'add_arguments_{name}')(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith('-')), None)
    command = command if command in COMMANDS else None
    try:
        try:
            args = _build_parser(command).parse_args(argv)
        except SystemExit as e:  # --help, --version, usage errors: argparse has printed them
            return e.code if isinstance(e.code, int) else 2
        return int(getattr(importlib.import_module(COMMANDS[command][0]), f'run_{command}')(args) or 0)
    except KeyboardInterrupt:
        print(f'mambavision {command}: interrupted', file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (| head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:
        if '--debug' in argv or _debug_from_env():
            raise
        hint = '' if isinstance(e, CliError) else ' (--debug shows the traceback)'
        print(f'mambavision {command}: error: {_one_line(e)}{hint}', file=sys.stderr)
        return 1
