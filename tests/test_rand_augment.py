"""MCL's strong view: RandAugment on device tensors against PIL (the reference's implementation), and the label
warp replaying exactly the image's geometry at another resolution."""

import numpy as np
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import torch
from PIL import Image

from uda_plugins.data.rand_augment import (
    FIXMATCH_POOL,
    GREY,
    RandAugmentDraw,
    apply_rand_augment,
    sample_rand_augment,
    warp_label,
)

H, W = 48, 80
IGNORE = 250


def _smooth_image(seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (H // 8, W // 8, 3)).astype(np.uint8)
    return np.array(Image.fromarray(coarse).resize((W, H), Image.BILINEAR))


def _pil_geometric(image, name, value, resample, fill):
    if name == "Rotate":
        return image.rotate(value, resample=resample, fillcolor=fill)
    coefficients = {
        "ShearX": (1, value, 0, 0, 1, 0),
        "ShearY": (1, 0, 0, value, 1, 0),
        "TranslateX": (1, 0, value, 0, 1, 0),
        "TranslateY": (1, 0, 0, 0, 1, value),
    }[name]
    return image.transform(image.size, Image.AFFINE, coefficients, resample=resample, fillcolor=fill)


def _chw(array):
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _hwc(tensor):
    return tensor.permute(1, 2, 0).numpy().astype(int)


@pytest.mark.parametrize(
    "name,value", [("ShearX", 0.213), ("ShearY", -0.237), ("TranslateX", 13), ("TranslateY", -9), ("Rotate", 17)]
)
def test_geometric_operations_sample_like_pil(name, value):
    label = np.random.default_rng(1).integers(0, 19, (H, W)).astype(np.uint8)
    draw = RandAugmentDraw((H, W), ops=[(name, float(value))])
    ours = warp_label(torch.from_numpy(label).long(), draw, IGNORE).numpy()
    reference = np.array(_pil_geometric(Image.fromarray(label), name, value, Image.NEAREST, IGNORE))
    assert (ours == reference).mean() > 0.999  # PIL's nearest, up to its 16.16 fixed-point ties
    image = _smooth_image()
    ours = _hwc(apply_rand_augment(_chw(image), draw))
    reference = np.array(_pil_geometric(Image.fromarray(image), name, value, Image.BILINEAR, (GREY,) * 3))
    assert np.abs(ours - reference).mean() < 1.0
    assert (ours == GREY).all(-1).sum() == pytest.approx((reference == GREY).all(-1).sum(), abs=0.05 * H * W)


@pytest.mark.parametrize(
    "name,value,pil",
    [
        ("AutoContrast", 0.0, lambda im, v: PIL.ImageOps.autocontrast(im)),
        ("Equalize", 0.0, lambda im, v: PIL.ImageOps.equalize(im)),
        ("Brightness", 1.5, lambda im, v: PIL.ImageEnhance.Brightness(im).enhance(v)),
        ("Color", 0.4, lambda im, v: PIL.ImageEnhance.Color(im).enhance(v)),
        ("Contrast", 1.6, lambda im, v: PIL.ImageEnhance.Contrast(im).enhance(v)),
        ("Sharpness", 1.7, lambda im, v: PIL.ImageEnhance.Sharpness(im).enhance(v)),
        ("Posterize", 5.0, lambda im, v: PIL.ImageOps.posterize(im, int(v))),
        ("Solarize", 100.0, lambda im, v: PIL.ImageOps.solarize(im, v)),
    ],
)
def test_photometric_operations_equal_pil(name, value, pil):
    image = _smooth_image(2)
    ours = _hwc(apply_rand_augment(_chw(image), RandAugmentDraw((H, W), ops=[(name, value)])))
    reference = np.array(pil(Image.fromarray(image), value)).astype(int)
    assert np.abs(ours - reference).max() <= 1  # rounding of the blends


def _classes_seen(image, palette):
    """The class whose colour each pixel shows (IGNORE where grey) and whether the pixel is clean (grey or a
    palette colour, not a bilinear blend of two blocks)."""
    distance = np.abs(image[:, :, None, :] - palette[None, None].astype(int)).sum(-1)
    grey = (image == GREY).all(-1)
    return np.where(grey, IGNORE, distance.argmin(-1)), grey | (distance.min(-1) <= 3)


@pytest.mark.parametrize("stride", [1, 4])
def test_the_label_sees_the_images_geometry_at_its_own_resolution(stride):
    # A class map of 8x8 blocks drawn as colours; the image is warped (flip, shear, rotation, translation, cutout),
    # the label map at full or a quarter of the size warped by replay: each label pixel names the class whose
    # colour the image shows at that pixel's centre.
    rng = np.random.default_rng(3)
    palette = rng.choice(256, (19, 3), replace=False).astype(np.uint8)
    palette[:, 0] = np.arange(19) * 12 + 10  # distinct, never grey
    classes = np.kron(rng.integers(0, 19, (H // 8, W // 8)), np.ones((8, 8), dtype=int))
    ops = [("ShearX", 0.3), ("Rotate", 25.0), ("TranslateY", 7.0)]
    draw = RandAugmentDraw((H, W), flip=True, ops=ops, cutout=(20, 8, 36, 24))
    warped = _hwc(apply_rand_augment(_chw(palette[classes]), draw))
    centre = stride // 2
    seen, clean = _classes_seen(warped[centre::stride, centre::stride], palette)
    assert clean.mean() > 0.6
    small = torch.from_numpy(classes[centre::stride, centre::stride].copy())
    label = warp_label(small, draw, IGNORE).numpy()
    assert label.shape == (H // stride, W // stride)
    assert (label == seen)[clean].mean() >= (1.0 if stride == 1 else 0.98)
    assert (label[8 // stride : 24 // stride, 20 // stride : 36 // stride] == IGNORE).all()  # the cutout
    swapped = RandAugmentDraw((H, W), flip=True, ops=ops[::-1], cutout=draw.cutout)
    assert (warp_label(small, swapped, IGNORE).numpy() == seen)[clean].mean() < 0.8  # the order matters


def test_draws_follow_randaugment_mc_and_replay_with_the_seed():
    torch.manual_seed(0)
    draws = [sample_rand_augment((H, W)) for _ in range(2000)]
    assert 0.45 < np.mean([d.flip for d in draws]) < 0.55
    counts = [len(d.ops) for d in draws]
    assert 0.9 < np.mean(counts) < 1.1  # two drawn, each applied with probability 1/2
    side = min(H, W) // 3
    for d in draws:
        x0, y0, x1, y1 = d.cutout
        assert x1 - x0 <= side and y1 - y0 <= side and 0 <= x0 and x1 <= W and y1 <= H
        for name, value in d.ops:
            assert name in FIXMATCH_POOL
            if name == "Rotate":
                assert 3 <= abs(value) <= 27  # int(v * 30 / 10), v in 1..9
            if name == "TranslateX":
                assert abs(value) <= int(0.27 * W)
            if name == "Brightness":
                assert 0.14 <= value <= 0.86  # v * 0.9 / 10 + 0.05
    torch.manual_seed(0)
    assert sample_rand_augment((H, W)) == draws[0]
    with pytest.raises(ValueError, match="2 <= m <= 10"):
        sample_rand_augment((H, W), n=2, m=1)
