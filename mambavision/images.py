"""Image files for classification: the sample image shipped with the package, and checked reading."""
import os
from importlib.resources import files

from PIL import Image, UnidentifiedImageError

from .runtime import UserError, one_line

__all__ = ['sample_image', 'open_image']


def sample_image():
    """The path of the sample image shipped with the package."""
    return files('mambavision') / 'assets' / 'sample.jpg'


def open_image(path, decode: bool = True):
    """The RGB PIL image at ``path``; with ``decode=False`` only check that it is one (reads the header).

    A missing file, a directory or an unreadable file is a one-line ``UserError``.
    """
    if not os.path.exists(path):
        raise UserError(f'image not found: {path}')
    if os.path.isdir(path):
        raise UserError(f'{path} is a directory, expected an image file')
    try:
        with Image.open(path) as image:
            return image.convert('RGB') if decode else None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f'cannot read {path} as an image ({one_line(e)})') from None
