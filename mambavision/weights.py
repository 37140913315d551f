"""Reading MambaVision weight files safely and mapping them onto ``MambaVision``.

Accepted files: the published ``.pth.tar`` training checkpoints (weights under
``state_dict``, beside an ``argparse.Namespace`` and optimizer state), the published
detection/segmentation files (mmengine checkpoints: ``state_dict`` beside ``meta``,
message hub and scheduler states, in torch's zip or legacy format), plain state dicts
(``.pth``, ``.bin``, ``.safetensors``), and the Hugging Face transformers form
(``model.`` prefix). Pickles are read with ``weights_only=True``: besides tensors and
containers, only the harmless classes in ``SAFE_GLOBALS`` are built, and the objects of
the modules in ``INERT_MODULES`` (mmengine's bookkeeping, numpy scalars) are replaced by
an inert stand-in without importing anything; ``getattr`` on such a stand-in (how pickle
protocol 2 writes a method, e.g. the ``statistics_methods`` of mmengine's ``HistoryBuffer``)
gives another stand-in. Any other class or function, and ``getattr`` on anything else, is refused.
"""
import argparse
import dataclasses
import os
import pickle
import re
import socket
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = [
    'read_checkpoint', 'read_state_dict', 'checkpoint_classes', 'model_args_from_checkpoint', 'checkpoint_filter_fn',
    'rename_published_keys_', 'load_pretrained_file', 'resolve_weights_source', 'download_weights',
    'load_state_dict_strict', 'SAFE_GLOBALS', 'INERT_MODULES',
]

SAFE_GLOBALS = [argparse.Namespace]
# top-level modules whose pickled objects are read as ``Inert`` stand-ins (what mmengine checkpoints hold
# besides the weights: message hub buffers, numpy scalars and arrays, config objects)
INERT_MODULES = ('mmengine', 'mmcv', 'mmdet', 'mmseg', 'numpy')
_MAX_INERT_NAMES = 256
_REFUSED = 'not allowed in a weight file'

# published name pattern -> our name (applied in order, first match wins)
_RENAMES: List[Tuple[str, Union[str, Callable[[re.Match[str]], str]]]] = [
    (r'^patch_embed\.conv_down\.0\.', 'stem.conv1.'),
    (r'^patch_embed\.conv_down\.1\.', 'stem.norm1.'),
    (r'^patch_embed\.conv_down\.3\.', 'stem.conv2.'),
    (r'^patch_embed\.conv_down\.4\.', 'stem.norm2.'),
    (r'^levels\.(\d+)\.downsample\.reduction\.0\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.conv.'),
    (r'^levels\.(\d+)\.blocks\.(\d+)\.gamma_1$', r'stages.\1.blocks.\2.ls1.gamma'),
    (r'^levels\.(\d+)\.blocks\.(\d+)\.gamma_2$', r'stages.\1.blocks.\2.ls2.gamma'),
    (r'^levels\.(\d+)\.blocks\.(\d+)\.gamma$', r'stages.\1.blocks.\2.ls.gamma'),
    (r'^levels\.', 'stages.'),
    (r'^outnorm(\d)\.', r'out_norms.\1.'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
]


def _published_to_ours(name: str) -> str:
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def rename_published_keys_(state_dict: Dict[str, Any], prefix: str = '') -> None:
    """In place: the published names of the tensors under ``prefix`` -> ours; a state dict of ours is left as is.

    ``MambaVision`` runs it before every ``load_state_dict``, so a published state dict loads
    directly, also through timm's ``create_model(..., checkpoint_path=...)``.
    """
    if prefix + 'stem.conv1.weight' in state_dict or prefix + 'patch_embed.conv_down.0.weight' not in state_dict:
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = prefix + _published_to_ours(key[len(prefix):])
        if name != key:
            state_dict[name] = state_dict.pop(key)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """Published (or transformers) tensor names -> ``MambaVision`` names; ours pass unchanged.

    A detection or segmentation model's state dict gives its ``backbone.*`` tensors.
    """
    for key in ('state_dict', 'model'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    if any(k.startswith(('backbone.patch_embed.', 'backbone.stem.')) for k in state_dict):
        state_dict = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    if 'stem.conv1.weight' in state_dict:
        return dict(state_dict)
    out = {}
    for name, tensor in state_dict.items():
        name = re.sub(r'^(module\.|model\.)+', '', name)
        out[_published_to_ours(name)] = tensor
    return out


def _describe(path: str) -> str:
    return os.path.basename(path) or path


def _read_error(e: Exception) -> str:
    """One line on why a weight file could not be read: a forbidden object, or a broken file."""
    text = str(e)
    match = re.search(r'GLOBAL ([\w.]+)', text)
    if match:
        return f'it holds {match[1]} which is {_REFUSED}'
    call = re.search(r'\[refused (getattr\(.*\))\]|call reduce for unrecognized function (\S+)', text)
    if call:
        return f'it calls {call[1] or call[2]} which is {_REFUSED}'
    unpickler = re.search(r'WeightsUnpickler error:\s*(\S[^\n]*)', text)
    detail = unpickler[1] if unpickler else text.strip().split('\n')[0].split('. ')[0] or type(e).__name__
    return f'it is truncated, corrupt or not a weight file ({detail})'


class Inert:
    """Stands in for an object of ``INERT_MODULES`` in a checkpoint: built from nothing, holds nothing, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return 'Inert()'


def _inert_getattr(obj, name, *default):
    """``getattr`` as a checkpoint calls it: on an ``Inert`` stand-in (class or object) another stand-in, never a
    real attribute; on anything else refused (a real object's attributes lead to modules and code)."""
    if obj is Inert or isinstance(obj, Inert):
        return Inert()
    raise pickle.UnpicklingError(f'[refused getattr({type(obj).__name__}, {str(name)[:40]!r})]')


def _load_pickle(path: str):
    """``torch.load(weights_only=True)``, with each global of ``INERT_MODULES`` it meets mapped to ``Inert``,
    and ``getattr`` to ``_inert_getattr``."""
    inert: List[str] = []
    while True:
        try:
            allowed: List[Any] = (SAFE_GLOBALS + [(_inert_getattr, 'builtins.getattr')]
                                  + [(Inert, name) for name in inert])
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location='cpu', weights_only=True, mmap=_is_zip(path))
        except pickle.UnpicklingError as e:
            match = re.search(r'GLOBAL ([\w.]+)', str(e))
            if not match or match[1].split('.')[0] not in INERT_MODULES or len(inert) >= _MAX_INERT_NAMES:
                raise
            inert.append(match[1])


def _is_zip(path: str) -> bool:
    with open(path, 'rb') as f:
        return f.read(4) == b'PK\x03\x04'


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The whole dict in weight or checkpoint file ``path``, read without running code.

    A missing file raises ``FileNotFoundError``; an unsafe, truncated or corrupt one, or
    one that holds no dict, a ``RuntimeError`` naming it, in one line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'weight file not found: {path}')
    with open(path, 'rb') as f:
        head = f.read(9)
    if not (head[:1] == b'\x80' or head[:4] == b'PK\x03\x04' or head[8:9] == b'{'):  # pickle, zip, safetensors
        raise RuntimeError(
            f'cannot read weight file {path}: it is truncated, corrupt or not a weight file (a weight file is '
            f'written by torch.save, .pth/.pth.tar/.bin: a zip archive or a pickle; or it is .safetensors)')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path, device='cpu')
        checkpoint = _load_pickle(path)
    except Exception as e:
        raise RuntimeError(f'cannot read weight file {path}: {_read_error(e)}') from None
    if not isinstance(checkpoint, dict):
        raise RuntimeError(f'weight file {path} holds a {type(checkpoint).__name__}, expected a dict of tensors')
    return checkpoint


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The weights in ``path`` (the ``state_dict`` entry of a training checkpoint), without running code."""
    return state_dict_of(read_checkpoint(path), path)


def state_dict_of(checkpoint: Dict[str, Any], path: str) -> Dict[str, torch.Tensor]:
    """The weights of ``checkpoint`` (read from ``path`` by ``read_checkpoint``): its ``state_dict`` entry, or the
    whole dict when it is a plain state dict."""
    for key in ('state_dict', 'model'):  # 'state_dict', not 'state_dict_ema': the published accuracies use it
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    not_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise RuntimeError(
            f'weight file {path} holds non-tensor entries among its weights: {", ".join(map(str, not_tensors[:5]))}')
    return checkpoint


def checkpoint_classes(checkpoint: Dict[str, Any]) -> Tuple[int, Optional[List[str]]]:
    """(class count, class names) of ``checkpoint`` (a dict from ``read_checkpoint``).

    A training checkpoint of ours states both in its ``config`` (names None when its data had
    none); any other file gives its classifier's row count and no names, 0 when it has no
    classifier (a backbone, a detection or segmentation file).
    """
    config = checkpoint.get('config')
    if isinstance(config, dict) and isinstance(config.get('num_classes'), int):
        classes = config.get('classes')
        return config['num_classes'], [str(c) for c in classes] if classes else None
    head = checkpoint_filter_fn(checkpoint).get('head.fc.weight')
    return (head.shape[0] if isinstance(head, torch.Tensor) else 0), None


def model_args_from_checkpoint(path: str) -> Dict[str, Any]:
    """The ``timm.create_model`` arguments that build a model with the classifier of weight file ``path``
    and load the file into it: ``timm.create_model(name, **model_args_from_checkpoint(path))``.

    The model gets the file's class count (``checkpoint_classes``), and its ``pretrained_cfg``
    the file's class names as ``label_names`` (``class i`` for outputs without a name).
    """
    path = os.fspath(path)
    num_classes, classes = checkpoint_classes(read_checkpoint(path))
    overlay: Dict[str, Any] = dict(file=path, num_classes=num_classes)
    if classes:
        overlay['label_names'] = classes + [f'class {i}' for i in range(len(classes), num_classes)]
    return dict(pretrained=True, pretrained_cfg_overlay=overlay)


def load_state_dict_strict(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state_dict)``; any missing, unexpected or mis-shaped tensor raises one
    ``RuntimeError`` line naming ``source`` and the first offenders.

    Names are compared after ``model``'s own ``load_state_dict`` pre-hooks, so published names count as ours.
    """
    own = model.state_dict()
    state_dict = dict(state_dict)
    for module_prefix, module in model.named_modules():  # the pre-hooks rename in place, as load_state_dict would
        for hook in module._load_state_dict_pre_hooks.values():
            hook(state_dict, module_prefix + '.' if module_prefix else '', {}, True, [], [], [])
    missing = [n for n in own if n not in state_dict]
    unexpected = [n for n in state_dict if n not in own]
    mismatched = [
        f'{n} (file {tuple(state_dict[n].shape)}, model {tuple(own[n].shape)})'
        for n in state_dict if n in own and state_dict[n].shape != own[n].shape]
    problems = [
        f'{what}: {", ".join(names[:5])}{" ..." if len(names) > 5 else ""}'
        for what, names in (('missing', missing), ('unexpected', unexpected), ('wrong shape', mismatched)) if names]
    if problems:
        raise RuntimeError(f'{source} does not fit {type(model).__name__}: ' + '; '.join(problems))
    model.load_state_dict(state_dict)


def load_pretrained_file(model: nn.Module, path: str, headless: bool = False) -> None:
    """Load weight file ``path`` into ``model`` strictly, adapting classifier and first conv as timm does.

    A classifier of another class count than the model's is an error, unless the model was
    asked for another class count than its ``pretrained_cfg`` declares for the file
    (fine-tuning, as in timm): then the file's classifier is dropped and the model's stays
    freshly initialised. A file without one needs ``num_classes=0``, unless ``headless``
    declares that the file has none: then the model keeps its own head. The
    first conv is adapted with timm's ``adapt_input_conv`` when ``in_chans`` differs; a
    classification file loaded into a dense backbone (``out_norm=True``) leaves its final
    norm out and the out-norms freshly initialised.
    Any other missing, unexpected or mis-shaped tensor raises a ``RuntimeError`` naming it.
    """
    from timm.models._manipulate import adapt_input_conv

    # tensors, and None for a classifier entry to leave out (dropped before loading)
    state_dict: Dict[str, Any] = checkpoint_filter_fn(read_state_dict(path), model)
    own = model.state_dict()
    conv = 'stem.conv1.weight'
    if conv in state_dict and conv in own and state_dict[conv].shape[1] != own[conv].shape[1]:
        state_dict[conv] = adapt_input_conv(own[conv].shape[1], state_dict[conv])
    head = state_dict.get('head.fc.weight')
    file_classes = head.shape[0] if head is not None else 0
    if head is not None and file_classes != getattr(model, 'num_classes', file_classes) and not headless:
        declared = getattr(model, 'pretrained_cfg', {}).get('num_classes')
        if model.num_classes == declared or declared is None:
            raise RuntimeError(
                f'weight file {_describe(path)} has a {file_classes}-class classifier, the model {model.num_classes} '
                f'classes: create it with num_classes={file_classes} (mambavision.weights.model_args_from_checkpoint '
                f'reads it from the file), or with another num_classes for a fresh classifier')
    for name in ('head.fc.weight', 'head.fc.bias'):
        if headless or name in state_dict and (name not in own or state_dict[name].shape != own[name].shape):
            state_dict[name] = own.get(name)  # fine-tuning, or no classifier in the file: keep the model's own head
    if any(k.startswith('out_norms.') for k in own) and not any(k.startswith('out_norms.') for k in state_dict):
        # classification weights into a dense backbone (fine-tuning as the published detectors were):
        # its final norm has no place there, the out-norms start fresh
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('norm.')}
        state_dict.update({k: v for k, v in own.items() if k.startswith('out_norms.')})
    state_dict = {k: v for k, v in state_dict.items() if v is not None}
    load_state_dict_strict(model, state_dict, f'weight file {_describe(path)}')


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE or os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES', 'TRUE'):
        return False
    url = urlparse(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ''):
        url = urlparse(proxy if '://' in proxy else f'http://{proxy}')  # the hub is reached through the proxy
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == 'https' else 80)), timeout).close()
    except OSError:
        return False
    return True


def _cached_hub_file(repo_id: str, filename: str, cache_dir: Optional[str], revision: Optional[str],
                     local_hint: str) -> Optional[str]:
    """The cached path of a hub file (no network), or None when the hub can be reached to download it.

    Neither: one ``RuntimeError`` line at once ending in ``local_hint``, instead of retrying for many seconds.
    """
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        return cached
    if not _hub_reachable():
        raise RuntimeError(
            f'cannot download {repo_id}/{filename}: the Hugging Face hub is unreachable (offline?); {local_hint}')
    return None


def download_weights(repo_id: str, filename: str, cache_dir: Optional[str] = None) -> str:
    """A local path of ``filename`` in Hugging Face repo ``repo_id``: cached, or downloaded
    (an unreachable hub fails at once, in one line)."""
    from huggingface_hub import hf_hub_download
    cached = _cached_hub_file(repo_id, filename, cache_dir, None, 'pass a local copy of the file instead')
    return cached or hf_hub_download(repo_id, filename, cache_dir=cache_dir)


def resolve_weights_source(cfg, cache_dir: Optional[str] = None):
    """``cfg`` (a timm ``PretrainedCfg``) pointed at a local file whenever one can serve.

    A local ``file`` is loaded through ``MambaVision.load_pretrained`` (timm would
    otherwise unpickle it with its generic loader, which prefers the EMA weights).
    Hub weights already in the local cache (``cache_dir``, as timm's) are used without touching the network;
    otherwise timm downloads them, and an unreachable hub fails at once with one line.
    """
    if cfg.file:
        return dataclasses.replace(cfg, custom_load=True)
    if cfg.state_dict is not None or not (cfg.hf_hub_id and cfg.hf_hub_filename):
        return cfg
    from timm.models._hub import hf_split
    repo_id, revision = hf_split(cfg.hf_hub_id)
    cached = _cached_hub_file(
        repo_id, cfg.hf_hub_filename, cache_dir, revision,
        'download it and pass pretrained_cfg_overlay=dict(file=PATH), or see the README, "Weights and offline use"')
    return dataclasses.replace(cfg, file=cached, custom_load=True) if cached else cfg
