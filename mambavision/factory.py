"""Classification models by name, for the commands and the trainers: name checks with close matches,
creation with the weights asked for, and the size and cost of each model."""
import difflib
import functools
import os
import sys
from typing import List, Optional, Sequence, Tuple

import timm
import torch

from .runtime import UserError, one_line

__all__ = ['MODEL_FAMILY', 'DEFAULT_MODEL', 'close_names', 'check_model_name', 'check_classifier_name',
           'model_complexity', 'published_weights',
           'fetch_published_weights', 'create_model_with_weights']

MODEL_FAMILY = ['mambavision*', 'test_mambavision']
DEFAULT_MODEL = 'mambavision_t.nv_in1k'


def close_names(name: str, known: Sequence[str], n: int = 3) -> List[str]:
    """Up to ``n`` names of ``known`` close to ``name``, ignoring case: first those whose architecture
    begins with ``name``'s ('mambavision_l3' -> 'mambavision_l3_256', 'mambavision_l3_512'; tagged ones first
    when ``name`` has a tag, else untagged ones),
    then difflib's close matches."""
    lower = {k.lower(): k for k in known}
    arch = name.lower().split('.')[0]
    starts = sorted((k for k in lower if k.split('.')[0].startswith(arch)),
                    key=lambda k: (('.' in k) != ('.' in name), len(k), k))
    close = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.6)
    return [lower[k] for k in dict.fromkeys(starts + close)][:n]


def check_model_name(name: str) -> str:
    """``name`` when it is a MambaVision model (``arch`` or ``arch.tag``), else a ``UserError`` naming close matches."""
    known = timm.list_models(MODEL_FAMILY) + timm.list_models(MODEL_FAMILY, pretrained=True)
    if name in known:
        return name
    close = close_names(name, known)
    hint = (f'did you mean {", ".join(close)}?' if close
            else f'expected one of {", ".join(timm.list_models("mambavision*"))}')
    raise UserError(f'unknown model {name!r}; {hint} (`mambavision info` lists them)')


def check_classifier_name(name: str) -> str:
    """``check_model_name``, and a ``UserError`` for a backbone tag without a classifier (the backbone of a
    published detector or segmenter, e.g. ``mambavision_t.nv_coco``), naming what to use instead."""
    check_model_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or cfg.num_classes != 0:
        return name
    arch = name.split('.')[0]
    classifiers = [n for n in timm.list_models(arch, pretrained=True) if timm.models.get_pretrained_cfg(n).num_classes]
    task, command = ('detector', 'detect') if 'coco' in cfg.tag else ('segmenter', 'segment')
    raise UserError(f'{name} is the backbone of a published {task}, without a classifier: `mambavision {command}` '
                    f'runs the {task}; for ImageNet classes use '
                    f'{", ".join(classifiers) or "a classification tag that `mambavision info` lists"}')


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


def published_weights(name: str) -> Optional[Tuple[str, str]]:
    """(Hugging Face repo, file name) of the published weights of timm name ``name``, or None when none are."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id and cfg.hf_hub_filename):
        return None
    return cfg.hf_hub_id, cfg.hf_hub_filename


def fetch_published_weights(name: str, repo: str, filename: str, local_flag: str,
                            random_flag: Optional[str] = None) -> str:
    """The local path of published file ``repo``/``filename`` (the weights of ``name``): from the Hugging Face
    cache, else downloaded into it. When it can be had neither way: a one-line ``UserError`` naming the file to
    download, where it comes from, and the command's own flags that take it (``local_flag``, e.g.
    ``--checkpoint``) or do without it (``random_flag``, e.g. ``--random-weights``)."""
    from .weights import download_weights

    try:
        return download_weights(repo, filename)
    except (RuntimeError, OSError) as e:  # offline, download refused (hub error), unwritable cache
        reason = ('the Hugging Face hub is unreachable' if 'unreachable' in str(e)
                  else f'the download failed: {one_line(e)}')
        without = f', or {random_flag} to try the model with random weights' if random_flag else ''
        raise UserError(
            f'the published weights of {name} are not in the Hugging Face cache and {reason}: download {filename} '
            f'from https://huggingface.co/{repo} and pass {local_flag} {filename}{without} '
            f'(README: "Weights and offline use")') from None


def create_model_with_weights(command: str, name: str, checkpoint: Optional[str] = None,
                              random_weights: bool = False, sample_run: bool = False):
    """Classification model ``name`` with the weights asked for, the policy of every command:

    ``checkpoint`` (a local file) when given; random weights only when asked for (``random_weights``, the
    ``--random-weights`` flag); else the published weights (local cache or hub), and when those cannot be had, or
    none are published for ``name``, a one-line ``UserError`` naming ``--checkpoint`` and ``--random-weights``.
    The one exception is ``sample_run`` (``mambavision predict`` on its sample image, a smoke test of the
    installation): there unavailable weights give random ones, announced in one warning line.
    Messages start with ``mambavision <command>``.
    """
    if checkpoint:
        from .weights import model_args_from_checkpoint

        if not os.path.isfile(checkpoint):
            raise UserError(f'checkpoint not found: {checkpoint}')
        return timm.create_model(name, **model_args_from_checkpoint(checkpoint))  # with the file's classifier
    if random_weights:
        print(f'mambavision {command}: RANDOM weights (--random-weights): the outputs mean nothing', file=sys.stderr)
        return timm.create_model(name)
    source = published_weights(name)
    try:
        if source is None:
            raise UserError(f'no weights are published for {name}: pass --checkpoint FILE, '
                            f'or --random-weights to try the model with random weights')
        path = fetch_published_weights(name, *source, local_flag='--checkpoint', random_flag='--random-weights')
    except UserError as e:
        if not sample_run:
            raise
        print(f'mambavision {command}: warning: {e}; the sample run goes on with RANDOM weights', file=sys.stderr)
        return timm.create_model(name)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    cfg = model.pretrained_cfg
    tagged = f'{cfg["architecture"]}.{cfg["tag"]}' if cfg.get('tag') else name  # the tag the weights are of
    print(f'mambavision {command}: published weights of {tagged}, licence {cfg.get("license")}', file=sys.stderr)
    return model
