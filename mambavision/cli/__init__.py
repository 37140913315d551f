"""The ``mambavision`` command line: ``mambavision COMMAND [options]`` (also ``python -m mambavision``).

Commands come from the ``COMMANDS`` table, ``name -> (module, one-line help)``. The
module of a command defines two functions:

    add_arguments_<name>(parser: argparse.ArgumentParser) -> None
    run_<name>(args: argparse.Namespace) -> int        # the exit status

Adding a command is one line in ``COMMANDS``. A command's module is imported only
when that command runs (or its ``--help`` is asked for), so ``mambavision info``
never imports the trainer or the exporter. The command-line modules import the
library; the library never imports them.

Any exception a command raises is printed as one line,
``mambavision <command>: error: <message>``, with a non-zero exit status; ``--debug``
(or the environment variable ``MAMBAVISION_DEBUG=1``) shows the traceback instead.
A ``mambavision.runtime.UserError`` (bad input) is printed as is, any other error with a
pointer to ``--debug``. Usage errors (an unknown option, a bad value) are one line too, named
after the command, with exit status 2.
"""
import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

__all__ = ['main', 'COMMANDS', 'int_at_least']

COMMANDS = {
    'info': ('mambavision.cli.info', 'show versions, device, scan backends and the models with their size and cost'),
    'predict': ('mambavision.cli.predict', "top-k classes of images and folders (ImageNet-1k, or a checkpoint's own)"),
    'benchmark': ('mambavision.cli.benchmark', 'measure inference throughput and latency'),
    'train': ('mambavision.cli.train', 'train or fine-tune on an image dataset, one process or many under torchrun'),
    'validate': ('mambavision.cli.train', 'top-1, top-5 and loss of a checkpoint or the published weights '
                 '(--task seg: ADE20K mIoU; --task det: COCO box and mask AP)'),
    'export': ('mambavision.cli.export',
               'write a model as an ONNX file (dynamic batch and image size) and check it in onnxruntime'),
    'segment': ('mambavision.cli.dense', 'semantic segmentation (ADE20K UPerNet): palette label maps and overlays'),
    'detect': ('mambavision.cli.dense',
               'instance segmentation (COCO Cascade Mask R-CNN): pictures and COCO results JSON'),
}


def _debug_from_env() -> bool:
    return os.environ.get('MAMBAVISION_DEBUG', '').strip().lower() in ('1', 'true', 'yes', 'on')


def int_at_least(minimum: int):
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


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line, ``mambavision <command>: error: <message> (...--help...)``,
    named after the command even when the top-level parser reports them (an unknown option after a command)."""

    command_prog: Optional[str] = None

    def error(self, message: str):
        prog = self.command_prog or self.prog
        self.exit(2, f'{prog}: error: {message} (`{prog} --help` lists the options)\n')


def _build_parser(command: Optional[str]) -> argparse.ArgumentParser:
    """The parser, with the arguments of ``command`` only (its module is imported; the others are not)."""
    import mambavision

    debug = _Parser(add_help=False)
    debug.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                       help='show the full traceback on errors (also MAMBAVISION_DEBUG=1)')
    parser = _Parser(prog='mambavision', parents=[debug], description='MambaVision backbones for PyTorch and timm.')
    parser.command_prog = f'mambavision {command}' if command else None
    parser.add_argument('--version', action='version', version=f'mambavision {mambavision.__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name, (module, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help, parents=[debug])
        if name == command:
            getattr(importlib.import_module(module), f'add_arguments_{name}')(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from mambavision.runtime import UserError, one_line

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
        hint = '' if isinstance(e, UserError) else ' (--debug shows the traceback)'
        print(f'mambavision {command}: error: {one_line(e)}{hint}', file=sys.stderr)
        return 1
