"""What ``create_detector`` and ``create_segmenter`` share: published names (with or without their tag), the
published file of a model (checked to be of its kind and width), and the checked strict load."""
from typing import Any, Dict, Optional, Sequence, Tuple, TypeVar, cast

import torch

from ..model import ARCHS
from ..published import PublishedModel, published_models

__all__ = [
    'unknown_name_error', 'published_entry', 'published_file', 'read_dense_checkpoint', 'read_published_file',
    'load_published_model',
]

# task -> (what the model is called in messages, the prefix of the tensors only that kind of model has)
_KINDS = {'det': ('Cascade Mask R-CNN', 'roi_head'), 'seg': ('UPerNet segmenter', 'decode_head')}
_TASK_WORDS = {'det': 'detector', 'seg': 'segmenter'}
ModelT = TypeVar('ModelT', bound=torch.nn.Module)


def unknown_name_error(kind: str, name: str, known: Sequence[str]) -> ValueError:
    """A one-line error for an unknown model ``name`` of ``kind`` ('detector', ...), naming close matches."""
    from ..factory import close_names
    close = close_names(name, known)
    hint = f'did you mean {", ".join(close)}?' if close else f'known: {", ".join(known)}'
    return ValueError(f'unknown {kind} {name!r}; {hint}')


def published_entry(task: str, name: str) -> PublishedModel:
    """The published model of ``task`` called ``name``, with its tag or without ('upernet_mambavision_t' is the
    one published UPerNet-T, as timm takes an architecture for its default tag); else a one-line ``ValueError``."""
    entries = published_models(task)
    by_name = {m.name: m for m in entries}
    untagged: Dict[str, list] = {}
    for m in entries:
        untagged.setdefault(m.name.split('.')[0], []).append(m)
    if name in by_name:
        return by_name[name]
    if len(untagged.get(name, ())) == 1:
        return untagged[name][0]
    raise unknown_name_error(_TASK_WORDS[task], name, list(by_name) + [n for n in untagged if n not in by_name])


def published_file(tag: str) -> Tuple[str, str]:
    """(Hugging Face repo, file name) of timm tag ``tag``: a classification tag or a dense backbone tag."""
    import timm
    cfg = timm.models.get_pretrained_cfg(tag)
    assert cfg.hf_hub_id and cfg.hf_hub_filename, tag  # every MambaVision tag names its hub repo and file
    return cfg.hf_hub_id, cfg.hf_hub_filename


def _variant(dim: Optional[int]) -> str:
    """'MambaVision-T' for the stage-1 width of MambaVision-T (the first published architecture of that width)."""
    arch = next((a for a, spec in ARCHS.items() if a.startswith('mambavision_') and spec.dim == dim), None)
    return f'MambaVision-{arch.split("_")[1].upper()}' if arch else 'MambaVision'


def _backbone_dim(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """The backbone width (stage 1 channels) of a detection/segmentation state dict, published names or ours."""
    for name in ('backbone.patch_embed.conv_down.3.weight', 'backbone.stem.conv2.weight'):
        if name in state_dict:
            return state_dict[name].shape[0]
    return None


def _classes_of(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The class arguments (``num_classes``, ``class_names``, ``palette``) that ``checkpoint`` records where mmengine
    and our trainer write them (``meta.dataset_meta``: ``classes``, ``palette``); {} when it records none."""
    meta = checkpoint.get('meta')
    dataset = meta.get('dataset_meta') if isinstance(meta, dict) else None
    classes = dataset.get('classes') if isinstance(dataset, dict) else None
    if not (isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes)):
        return {}
    found: Dict[str, Any] = dict(num_classes=len(classes), class_names=list(classes))
    palette = dataset.get('palette')
    if isinstance(palette, (list, tuple)) and len(palette) == len(classes) and all(
            isinstance(c, (list, tuple)) and len(c) == 3 and all(isinstance(v, int) for v in c) for c in palette):
        found['palette'] = [list(c) for c in palette]
    return found


def read_dense_checkpoint(checkpoint_path: Optional[str], kwargs: Dict[str, Any]) -> Tuple[Optional[dict], dict]:
    """(the checkpoint at ``checkpoint_path`` read without running code, or None; the model arguments ``kwargs``
    completed by the classes the checkpoint records: a fine-tuned model comes back with its own classes, names and
    palette unless ``kwargs`` names a class count of its own)."""
    from ..weights import read_checkpoint
    if checkpoint_path is None:
        return None, kwargs
    checkpoint = read_checkpoint(checkpoint_path)
    return checkpoint, kwargs if 'num_classes' in kwargs else {**_classes_of(checkpoint), **kwargs}


def read_published_file(entry: PublishedModel, checkpoint: Optional[Dict[str, Any]], checkpoint_path: Optional[str],
                        model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict of ``checkpoint`` (read from ``checkpoint_path``), or of the downloaded published file of
    ``entry``, checked to hold a model of ``entry``'s kind of ``model``'s backbone width.

    Another kind of model, or another variant's file, raises one ``ValueError`` line naming it.
    """
    from ..weights import download_weights, read_state_dict, state_dict_of
    kind, head = _KINDS[entry.task]
    if checkpoint is not None and checkpoint_path is not None:
        source, state_dict = checkpoint_path, state_dict_of(checkpoint, checkpoint_path)
    else:
        source = download_weights(entry.hf_repo, entry.hf_file)
        state_dict = read_state_dict(source)
    prefixes = {k.split('.')[0] for k in state_dict}
    if head not in prefixes:
        held = ('a detection model' if 'roi_head' in prefixes else 'a segmentation model' if 'decode_head' in prefixes
                else 'a backbone without heads' if 'backbone' in prefixes else 'a classification model')
        raise ValueError(f'{source} holds {held} (no {head}.* tensors), not a {kind}')
    file_dim, model_dim = _backbone_dim(state_dict), cast(int, model.backbone.feature_info[0]['num_chs'])
    if file_dim != model_dim:
        raise ValueError(
            f'{source} is a {_variant(file_dim)} {kind} (dim {file_dim}), the model is {_variant(model_dim)} '
            f'(dim {model_dim}); pick the name that matches the file')
    return state_dict


def load_published_model(
        model: ModelT, entry: PublishedModel, checkpoint: Optional[Dict[str, Any]], checkpoint_path: Optional[str],
        pretrained: bool, class_specific: Sequence[str] = (),
) -> ModelT:
    """What ``create_detector`` and ``create_segmenter`` do once they built ``model``: ``model.published`` (the
    Hugging Face repo and file, published metrics of ``entry``) set, the weights of ``checkpoint`` (read from
    ``checkpoint_path`` by ``read_dense_checkpoint``) or (``pretrained``) of the published file checked
    (``read_published_file``) and loaded strictly, eval mode.

    Tensors whose names contain one of ``class_specific`` and whose shape differs from the file's (one's own
    classes) keep the model's fresh values; ``model.published['fresh']`` then names them.
    """
    from ..weights import load_state_dict_strict
    published: Dict[str, Any] = dict(hf_repo=entry.hf_repo, file=entry.hf_file, **entry.metrics)
    model.published = published  # type: ignore[assignment]  # torch types Module.__setattr__ for tensors and modules
    if checkpoint_path is not None or pretrained:
        state_dict = read_published_file(entry, checkpoint, checkpoint_path, model)
        fresh = {k: v for k, v in model.state_dict().items() if any(part in k for part in class_specific)
                 and k in state_dict and state_dict[k].shape != v.shape}
        load_state_dict_strict(model, {**state_dict, **fresh}, str(checkpoint_path or entry.hf_file))
        if fresh:
            published['fresh'] = sorted(fresh)
    return model.eval()
