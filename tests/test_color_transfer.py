"""MCL's L*a*b* colour transfer on the device: the conversion matches OpenCV's, the transferred image takes the
style's L*a*b* statistics, and the result is OpenCV's reference implementation up to its 8-bit rounding."""

import cv2
import numpy as np
import torch

from uda_plugins.data.color_transfer import lab_color_transfer, lab_to_rgb, rgb_to_lab


def _images(seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (2, 24, 32, 3)).astype(np.float32)
    smooth = np.stack([cv2.GaussianBlur(b, (0, 0), 3) for b in base])  # natural-ish images, not white noise
    return np.clip(smooth * rng.uniform(0.5, 1.5, 3) + rng.uniform(-40, 40, 3), 0, 255).astype(np.uint8)


def _to_tensor(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def test_lab_conversion_matches_opencv_and_inverts():
    images = _images(0)
    ours = rgb_to_lab(_to_tensor(images)).permute(0, 2, 3, 1).numpy()
    for k in range(2):
        reference = cv2.cvtColor(images[k].astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
        np.testing.assert_allclose(ours[k], reference, atol=0.25)  # OpenCV uses table approximations
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(_to_tensor(images))), _to_tensor(images), atol=0.02, rtol=0)


def _opencv_transfer(content_rgb, style_rgb):
    # feifei-cv/MCL color.py color_transfer(source=style, target=content), on BGR uint8
    style = cv2.cvtColor(style_rgb[:, :, ::-1].copy(), cv2.COLOR_BGR2LAB).astype("float32")
    content = cv2.cvtColor(content_rgb[:, :, ::-1].copy(), cv2.COLOR_BGR2LAB).astype("float32")
    out = []
    for ch in range(3):
        x = (content[..., ch] - content[..., ch].mean()) * (style[..., ch].std() / (content[..., ch].std() + 1e-30))
        out.append(np.clip(x + style[..., ch].mean(), 0, 255))
    return cv2.cvtColor(np.stack(out, -1).astype("uint8"), cv2.COLOR_LAB2BGR)[:, :, ::-1]


def test_the_transfer_takes_the_style_statistics_and_matches_the_reference():
    content, style = _images(1), _images(2)
    out = lab_color_transfer(_to_tensor(content), _to_tensor(style))
    lab_out, lab_style = rgb_to_lab(out), rgb_to_lab(_to_tensor(style))
    torch.testing.assert_close(lab_out.mean((2, 3)), lab_style.mean((2, 3)), atol=1.5, rtol=0)
    torch.testing.assert_close(lab_out.std((2, 3)), lab_style.std((2, 3)), atol=1.5, rtol=0.05)
    for k in range(2):
        reference = _opencv_transfer(content[k], style[k]).astype(np.float32)
        assert np.abs(out[k].permute(1, 2, 0).numpy() - reference).mean() < 3.0  # OpenCV rounds L*a*b* to 8 bits
    # the content's structure is kept: same ordering of lightness within the image
    lightness = [rgb_to_lab(t)[0, 0].flatten().numpy() for t in (_to_tensor(content), out)]
    assert np.corrcoef(lightness[0], lightness[1])[0, 1] > 0.95
