"""Image files for the commands: the sample image shipped with the package, image files found in folders,
and checked reading (EXIF orientation applied, a limit on the decoded size)."""
import os
from importlib.resources import files
from pathlib import Path
from typing import Iterable, List

from PIL import Image, ImageOps, UnidentifiedImageError

from .runtime import UserError, one_line

__all__ = ['MAX_IMAGE_PIXELS', 'sample_image', 'image_files', 'check_image_size', 'open_image']

# Images above this many pixels are refused (a guard against decompression bombs: a small file that decodes to
# gigabytes). It is the size at which PIL itself refuses (2x its warning limit), 179 MP, e.g. 16384 x 10922;
# MAMBAVISION_MAX_IMAGE_PIXELS raises it.
MAX_IMAGE_PIXELS = 2 * 89_478_485


def sample_image():
    """The path of the sample image shipped with the package."""
    return files('mambavision') / 'assets' / 'sample.jpg'


def image_files(paths: Iterable[str]) -> List[str]:
    """``paths`` with every folder replaced by the image files below it (recursively, sorted, by extension:
    ``mambavision.dense.data.transforms.IMAGE_EXTENSIONS``); a folder without any is a one-line ``UserError``.
    Files are kept as given."""
    from .dense.data.transforms import IMAGE_EXTENSIONS

    found = []
    for path in map(str, paths):
        if not os.path.isdir(path):
            found.append(path)
            continue
        inside = sorted(str(p) for p in Path(path).rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not inside:
            raise UserError(f'{path} is a folder without image files ({", ".join(IMAGE_EXTENSIONS)}, '
                            f'searched recursively)')
        found += inside
    return found


def _max_pixels() -> int:
    text = os.environ.get('MAMBAVISION_MAX_IMAGE_PIXELS', '')
    if not text:
        return MAX_IMAGE_PIXELS
    if not text.isdigit():
        raise UserError(f'MAMBAVISION_MAX_IMAGE_PIXELS={text}: expected a number of pixels')
    return int(text)


def check_image_size(path, width: int, height: int):
    """A one-line ``UserError`` when a ``width`` x ``height`` image is above the pixel limit (``MAX_IMAGE_PIXELS``)."""
    limit = _max_pixels()
    if width * height > limit:
        raise UserError(f'{path} is {width}x{height} = {width * height / 1e6:.0f} MP, above the limit of '
                        f'{limit / 1e6:.0f} MP on decoded images (a guard against decompression bombs); '
                        f'set MAMBAVISION_MAX_IMAGE_PIXELS={width * height} to read it')


def open_image(path, decode: bool = True):
    """The RGB PIL image at ``path``, turned upright as its EXIF orientation says; with ``decode=False`` only check
    that it is one (reads the header).

    A missing file, a directory, an unreadable file or one above the pixel limit is a one-line ``UserError``.
    """
    if not os.path.exists(path):
        raise UserError(f'image not found: {path}')
    if os.path.isdir(path):
        raise UserError(f'{path} is a directory, expected an image file')
    max_pixels, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # PIL's own guard: the limit is ours
    try:
        with Image.open(path) as image:
            check_image_size(path, *image.size)
            return ImageOps.exif_transpose(image).convert('RGB') if decode else None
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f'cannot read {path} as an image ({one_line(e)})') from None
    finally:
        Image.MAX_IMAGE_PIXELS = max_pixels
