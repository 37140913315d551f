"""What the detection and segmentation training data share: image file names and sizes."""
from typing import Tuple

__all__ = ['IMAGE_EXTENSIONS', 'image_file_size']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')


def image_file_size(path: str) -> Tuple[int, int]:
    """(height, width) of an image file as OpenCV decodes it (EXIF orientation applied), from its header."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except OSError as e:
        raise ValueError(f'cannot read image {path}: {e}') from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)
