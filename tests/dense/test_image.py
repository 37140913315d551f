"""The image steps of the published test pipelines: input forms, conversions, mmcv's keep-ratio resize."""
import numpy as np
import pytest
import torch
from PIL import Image

from mambavision.dense.image import as_rgb_images, normalize, resize_keep_ratio


def _rgb(h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_every_input_form_gives_the_same_rgb_array(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / 'x.png')
    forms = [rgb, torch.from_numpy(rgb), Image.fromarray(rgb), str(tmp_path / 'x.png'), tmp_path / 'x.png']
    for form in forms:
        (out,) = as_rgb_images(form)
        assert out.dtype == np.uint8 and np.array_equal(out, rgb), type(form)
    assert len(as_rgb_images(forms)) == len(forms)


def test_grayscale_rgba_and_16_bit_are_converted(tmp_path):
    rgb = _rgb()
    gray = rgb[:, :, 0]
    assert np.array_equal(as_rgb_images(gray)[0], np.stack([gray] * 3, axis=2))
    assert np.array_equal(as_rgb_images(Image.fromarray(gray))[0], np.stack([gray] * 3, axis=2))
    rgba = np.concatenate([rgb, np.full_like(gray[:, :, None], 7)], axis=2)
    assert np.array_equal(as_rgb_images(rgba)[0], rgb)
    assert np.array_equal(as_rgb_images(Image.fromarray(rgba, 'RGBA'))[0], rgb)
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    assert np.array_equal(as_rgb_images(tmp_path / 'rgba.png')[0], rgb)
    # 8-bit values scaled to 16 bits, plus less than half a step
    sixteen = (rgb.astype(np.uint32) * 257 + 100).clip(max=65535).astype(np.uint16)
    assert np.array_equal(as_rgb_images(sixteen)[0], rgb)
    # a 16-bit file is decoded as mmcv decodes it: OpenCV keeps the high byte
    Image.fromarray(sixteen[:, :, 0]).save(tmp_path / 'gray16.png')
    high_byte = (sixteen[:, :, 0] >> 8).astype(np.uint8)
    assert np.array_equal(as_rgb_images(tmp_path / 'gray16.png')[0], np.stack([high_byte] * 3, axis=2))


@pytest.mark.parametrize('bad, message', [
    (np.zeros((4, 4, 3), np.float32), r'expected a uint8 \(or 16-bit\) image, got dtype float32'),
    (np.zeros((4, 4, 2), np.uint8), r'expected an \(H, W, 3\) RGB image .* got shape \(4, 4, 2\)'),
    (np.zeros((0, 4, 3), np.uint8), r'got shape \(0, 4, 3\)'),
    (np.zeros((3, 4, 4, 3), np.uint8), r'got shape \(3, 4, 4, 3\)'),
    ([], 'expected at least one image'),
    (42, 'expected a PIL image, a numpy array, a tensor or a path, got int'),
])
def test_bad_images_are_refused_in_one_line(bad, message):
    with pytest.raises((ValueError, TypeError), match=message) as info:
        as_rgb_images(bad)
    assert '\n' not in str(info.value)


def test_missing_and_unreadable_files_are_refused_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match='image not found'):
        as_rgb_images(tmp_path / 'missing.jpg')
    (tmp_path / 'broken.jpg').write_bytes(b'not an image')
    with pytest.raises(ValueError, match='cannot read image') as info:
        as_rgb_images(tmp_path / 'broken.jpg')
    assert '\n' not in str(info.value)
    with pytest.raises(IsADirectoryError, match=f'^{tmp_path} is a directory, expected an image file$'):
        as_rgb_images(str(tmp_path))


@pytest.mark.parametrize('h, w, scale, new_h, new_w', [
    (480, 640, (1333, 800), 800, 1067),     # short side limits: 800 / 480
    (100, 1000, (1333, 800), 133, 1333),    # long side limits: 1333 / 1000
    (1, 1, (1333, 800), 800, 800),          # a 1x1 image becomes the short edge
    (8000, 10000, (1333, 800), 800, 1000),  # a huge image comes down
    (683, 512, (2048, 512), 683, 512),      # already at scale
    (375, 500, (2048, 512), 512, 683),      # int(x * factor + 0.5) rounding
])
def test_resize_keep_ratio_follows_mmcv(h, w, scale, new_h, new_w):
    resized, (sx, sy) = resize_keep_ratio(np.zeros((h, w, 3), np.uint8), scale)
    assert resized.shape == (new_h, new_w, 3) and resized.dtype == np.uint8
    assert (sx, sy) == (new_w / w, new_h / h)


def test_resize_is_bilinear_on_uint8():
    cv2 = pytest.importorskip('cv2')
    image = _rgb(30, 20)
    resized, _ = resize_keep_ratio(image, (64, 45))  # factor min(64 / 30, 45 / 20): 64 x 43
    assert np.array_equal(resized, cv2.resize(image, (43, 64), interpolation=cv2.INTER_LINEAR))


def test_normalize_uses_the_published_mean_and_std():
    x = normalize(np.array([[[182, 116, 0]]], np.uint8))
    assert x.shape == (3, 1, 1) and x.dtype == torch.float32
    expected = (torch.tensor([182., 116., 0.]) - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor(
        [58.395, 57.12, 57.375])
    torch.testing.assert_close(x.flatten(), expected)


@pytest.mark.parametrize('size, scale, resized', [
    ((20, 5), (10, 10), (10, 3)),  # factor 0.5: width 2.5 -> 3 (Python's round: 2)
    ((2, 3), (6, 3), (3, 5)),  # factor 1.5: width 4.5 -> 5 (round: 4)
    ((5, 20), (10, 10), (3, 10)),  # factor 0.5: height 2.5 -> 3 (round: 2)
])
def test_resized_sizes_round_half_up_as_mmcv(size, scale, resized):
    """mmcv's rescale rounds the new size with int(x * factor + 0.5): halves go up, not to even."""
    image, factors = resize_keep_ratio(_rgb(*size), scale)
    assert image.shape[:2] == resized
    assert factors == (resized[1] / size[1], resized[0] / size[0])
