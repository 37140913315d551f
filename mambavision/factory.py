"""Classification models by name, for the commands and the trainers: name checks with close matches,
creation with the weights asked for, and the size and cost of each model."""
import difflib
import functools
import os
import sys
from typing import Optional

import timm
import torch

from .runtime import UserError, one_line

__all__ = ['MODEL_FAMILY', 'DEFAULT_MODEL', 'check_model_name', 'model_complexity', 'create_model_with_weights']

MODEL_FAMILY = ['mambavision*', 'test_mambavision']
DEFAULT_MODEL = 'mambavision_t.nv_in1k'


def check_model_name(name: str) -> str:
    """``name`` when it is a MambaVision model (``arch`` or ``arch.tag``), else a ``UserError`` naming close matches."""
    known = timm.list_models(MODEL_FAMILY) + timm.list_models(MODEL_FAMILY, pretrained=True)
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = (f'did you mean {", ".join(close)}?' if close
            else f'expected one of {", ".join(timm.list_models("mambavision*"))}')
    raise UserError(f'unknown model {name!r}; {hint} (`mambavision info` lists them)')


@functools.cache
def model_complexity(name: str):
    """(parameters, multiply-accumulates per image) of model ``name`` at its native input size.

    Model and input live on the 'meta' device (shapes only: no memory, no compute), and
    ``torch.utils.flop_counter.FlopCounterMode`` counts the convolutions and matmuls,
    attention included; elementwise work and the scan's recurrence are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device('meta'):
        model = timm.create_model(name).eval()
        x = torch.empty(1, *model.pretrained_cfg['input_size'])
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def create_model_with_weights(command: str, name: str, checkpoint: Optional[str], require_weights: bool,
                              hint: str, random_weights: bool = False):
    """Model ``name`` with the weights asked for: ``checkpoint`` (a local file) when given, else the
    published ones (hub or local cache). When those cannot be had, or none are published, or
    ``random_weights`` is set: random weights announced in one line on stderr, or, with
    ``require_weights``, a ``UserError`` saying why (``hint`` tells the way out). Messages start
    with ``mambavision <command>``."""
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise UserError(f'checkpoint not found: {checkpoint}')
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
            reason = one_line(e)
        else:
            print(f'mambavision {command}: published weights of {model.pretrained_cfg["architecture"]}.'
                  f'{model.pretrained_cfg["tag"]}, licence {cfg.license}', file=sys.stderr)
            return model
    if require_weights and not random_weights:
        raise UserError(f'{reason} ({hint})')
    print(f'mambavision {command}: warning: {reason}; using RANDOM weights ({hint})', file=sys.stderr)
    return timm.create_model(name)
