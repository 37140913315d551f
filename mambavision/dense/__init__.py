"""Dense prediction with MambaVision: NVIDIA's published detection (Cascade Mask R-CNN, COCO) and
segmentation (UPerNet, ADE20K) models, without mmcv/mmdet/mmseg, and the pieces they share."""
import difflib
from typing import Sequence

__all__ = ['unknown_name_error']


def unknown_name_error(kind: str, name: str, known: Sequence[str]) -> ValueError:
    """A one-line error for an unknown model ``name`` of ``kind`` ('detector', ...), naming close matches."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f'did you mean {", ".join(close)}?' if close else f'known: {", ".join(known)}'
    return ValueError(f'unknown {kind} {name!r}; {hint}')
