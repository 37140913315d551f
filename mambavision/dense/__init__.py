"""Dense prediction with MambaVision: NVIDIA's published detection (Cascade Mask R-CNN, COCO) and
segmentation (UPerNet, ADE20K) models, without mmcv/mmdet/mmseg, and the pieces they share."""
import difflib
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

__all__ = ['unknown_name_error', 'published_file', 'read_published_file', 'load_published_model']

_VARIANT_BY_DIM = {80: 'MambaVision-T', 96: 'MambaVision-S', 128: 'MambaVision-B', 196: 'MambaVision-L',
                   256: 'MambaVision-L3'}


def unknown_name_error(kind: str, name: str, known: Sequence[str]) -> ValueError:
    """A one-line error for an unknown model ``name`` of ``kind`` ('detector', ...), naming close matches."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f'did you mean {", ".join(close)}?' if close else f'known: {", ".join(known)}'
    return ValueError(f'unknown {kind} {name!r}; {hint}')


def _backbone_dim(state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    """The backbone width (stage 1 channels) of a detection/segmentation state dict, published names or ours."""
    for name in ('backbone.patch_embed.conv_down.3.weight', 'backbone.stem.conv2.weight'):
        if name in state_dict:
            return state_dict[name].shape[0]
    return None


def published_file(backbone_tag: str) -> Tuple[str, str]:
    """(Hugging Face repo, file name) of the published model whose backbone is timm tag ``backbone_tag``."""
    import timm
    cfg = timm.models.get_pretrained_cfg(backbone_tag)
    return cfg.hf_hub_id, cfg.hf_hub_filename


def read_published_file(
        backbone_tag: str, checkpoint_path: Optional[str], kind: str, head: str, model: torch.nn.Module,
) -> Dict[str, torch.Tensor]:
    """The state dict of ``checkpoint_path``, or of the downloaded published file of ``backbone_tag``,
    checked to hold a ``kind`` model (tensors under ``head``) of ``model``'s backbone width.

    Another kind of model, or another variant's file, raises one ``ValueError`` line naming it.
    """
    from ..weights import download_weights, read_state_dict
    source = checkpoint_path if checkpoint_path is not None else download_weights(*published_file(backbone_tag))
    state_dict = read_state_dict(source)
    prefixes = {k.split('.')[0] for k in state_dict}
    if head not in prefixes:
        held = ('a detection model' if 'roi_head' in prefixes else 'a segmentation model' if 'decode_head' in prefixes
                else 'a backbone without heads' if 'backbone' in prefixes else 'a classification model')
        raise ValueError(f'{source} holds {held} (no {head}.* tensors), not a {kind}')
    file_dim, model_dim = _backbone_dim(state_dict), model.backbone.feature_info[0]['num_chs']
    if file_dim != model_dim:
        file_variant, model_variant = (_VARIANT_BY_DIM.get(d, 'MambaVision') for d in (file_dim, model_dim))
        raise ValueError(
            f'{source} is a {file_variant} {kind} (dim {file_dim}), the model is {model_variant} '
            f'(dim {model_dim}); pick the name that matches the file')
    return state_dict


def load_published_model(
        model: torch.nn.Module, backbone_tag: str, checkpoint_path: Optional[str], pretrained: bool, kind: str,
        head: str, metrics: Dict[str, Any], class_specific: Sequence[str] = (),
) -> torch.nn.Module:
    """What ``create_detector`` and ``create_segmenter`` do once they built ``model``: ``model.published`` (Hugging
    Face repo and file of ``backbone_tag``, ``metrics``) set, the weights of ``checkpoint_path`` or (``pretrained``)
    of the published file checked (``read_published_file``) and loaded strictly, eval mode.

    Tensors whose names contain one of ``class_specific`` and whose shape differs from the file's (one's own
    classes) keep the model's fresh values; ``model.published['fresh']`` then names them.
    """
    from ..weights import load_state_dict_strict
    repo, filename = published_file(backbone_tag)
    model.published = dict(hf_repo=repo, file=filename, **metrics)
    if checkpoint_path is not None or pretrained:
        state_dict = read_published_file(backbone_tag, checkpoint_path, kind, head, model)
        fresh = {k: v for k, v in model.state_dict().items() if any(part in k for part in class_specific)
                 and k in state_dict and state_dict[k].shape != v.shape}
        load_state_dict_strict(model, {**state_dict, **fresh}, str(checkpoint_path or filename))
        if fresh:
            model.published['fresh'] = sorted(fresh)
    return model.eval()
