"""Each release's resize / random scale / crop / pad rule (uda_plugins.data.transforms.GeometryRule) against a
transcription of the release's own transform, at the real datasets' sizes.

The releases draw with Python's ``random``, we with a numpy Generator, and in another order; a scripted generator
(:class:`Scripted`) gives both the same numbers, so sizes, crop boxes, padding and flips must agree exactly. Image
content is compared where both resample alike (ILM-ASSL: torch's bilinear and nearest, like cv2's); where a
release resamples twice with PIL (MCL, DUDA) only the geometry and the label's agreement on large regions are."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from uda_plugins.config import get_uda_cfg
from uda_plugins.data.mapper import UDADatasetMapper
from uda_plugins.data.transforms import GeometryRule, apply_geometry
from uda_plugins.modeling.segmentor import size_groups, stack_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


class Scripted:
    """A stand-in for np.random.Generator whose ``uniform`` and ``integers`` return scripted values in order:
    ``uniform(a, b)`` = a + (b - a) * v, ``integers(a, b)`` = a + k."""

    def __init__(self, values):
        self.values = list(values)

    def uniform(self, low=0.0, high=1.0):
        return low + (high - low) * self.values.pop(0)

    def integers(self, low, high):
        k = self.values.pop(0)
        assert 0 <= k < high - low
        return low + k


def _blocky_label(h, w, block=64, seed=0):
    """Classes in blocks: large regions, so a one-pixel resampling shift changes only their borders."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 19, (h // block + 1, w // block + 1)).astype(np.uint8)
    return np.kron(blocks, np.ones((block, block), np.uint8))[:h, :w].copy()


def _image(h, w, seed=1):
    # Smooth content, so bilinear resampling differences stay at rounding level.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255.0 / w, yy * 255.0 / h, (xx + yy) * 127.0 / (h + w) + 64], axis=-1)
    return base.round().astype(np.uint8)


# ------------------------------------------------------------------------------------------------ ILM-ASSL (STAL)
def _ilm_assl_transform(image, label, draws, scale=(0.5, 2.0)):
    """licongguan/ILM-ASSL@d10fd0f core/dataset/augmentation.py: ToTensor + Normalize, RandResize(``scale``: the
    main [0.5, 2.0], the paste samples' acp.rand_resize [0.1, 2.0]) (:191-211; the sizes from the image's, the label
    resized to them), RandomHorizontalFlip (:299-304), Crop(769, "rand") (:213-266; the label padded with 0 at
    :242-243), with ``random`` scripted by ``draws``."""
    script = list(draws)
    rand = lambda: script.pop(0)  # noqa: E731
    randint = lambda a, b: a + script.pop(0)  # noqa: E731  (randint includes b)
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].double() - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    y = torch.from_numpy(label)[None, None].double()
    if rand() < 0.5:
        temp_scale = scale[0] + (1.0 - scale[0]) * rand()
    else:
        temp_scale = 1.0 + (scale[1] - 1.0) * rand()
    h, w = x.size()[-2:]
    new_w, new_h = int(w * temp_scale), int(h * temp_scale)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    y = F.interpolate(y, size=(new_h, new_w), mode="nearest")
    if rand() < 0.5:
        x, y = torch.flip(x, [3]), torch.flip(y, [3])
    crop_h = crop_w = 769
    h, w = x.size()[-2:]
    pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
    pad_h_half, pad_w_half = int(pad_h / 2), int(pad_w / 2)
    if pad_h > 0 or pad_w > 0:
        border = (pad_w_half, pad_w - pad_w_half, pad_h_half, pad_h - pad_h_half)
        x = F.pad(x, border, mode="constant", value=0.0)
        y = F.pad(y, border, mode="constant", value=0)
    h, w = x.size()[-2:]
    h_off, w_off = randint(0, h - crop_h), randint(0, w - crop_w)
    x = x[:, :, h_off : h_off + crop_h, w_off : w_off + crop_w]
    y = y[:, :, h_off : h_off + crop_h, w_off : w_off + crop_w]
    return x[0].permute(1, 2, 0).numpy(), y[0, 0].numpy().astype(np.uint8), (new_h, new_w)


def _stal_cfg():
    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs/gta5_cityscapes/stal_dlv3p_r101_1pct.yaml"))
    return cfg


@pytest.mark.parametrize(
    "below, v, flip, h_off, w_off",
    [
        (0.2, 0.1, 0.9, 0, 300),  # scale 0.55: 563x1126, padded to 769 in height
        (0.3, 0.48, 0.1, 0, 17),  # scale 0.74: padded by 11 rows (5 above, 6 below), flipped
        (0.7, 0.4, 0.6, 230, 1500),  # scale 1.4: no padding
        (0.1, 0.99, 0.2, 24, 0),  # scale 0.995
    ],
)
def test_ilm_assl_scale_pad_and_crop_equal_the_release(below, v, flip, h_off, w_off):
    cfg = _stal_cfg()
    mapper = UDADatasetMapper.from_config(cfg, "source", load_label=True)
    rule = mapper.rule
    assert (rule.resize_mode, rule.ratio_sampling, rule.size_rounding, rule.crop_pad) == (
        "exact",
        "split_at_one",
        "floor",
        "center",
    )
    assert mapper.pad_label == 0  # the release's road padding (CROP_PAD_LABEL 0 in the paper configs)
    image, label = _image(1024, 2048), _blocky_label(1024, 2048)
    theirs_image, theirs_label, (rh, rw) = _ilm_assl_transform(image, label, [below, v, flip, h_off, w_off])

    # Ours crops, then flips: a flipped crop at left offset L equals the release's crop at w_off of the flipped
    # image when L = padded width - 769 - w_off.
    padded_w = max(rw, 769)
    left = padded_w - 769 - w_off if flip < 0.5 else w_off
    geometry = rule.sample(Scripted([below, v, h_off, left, flip]), (1024, 2048))
    assert geometry.resized_size == (rh, rw) and geometry.output_size == (769, 769)
    assert geometry.padded == (rh < 769)
    ours_label = apply_geometry(label, geometry, is_label=True, pad_value=mapper.pad_label)
    ours_image = (apply_geometry(image, geometry, is_label=False, pad_value=mapper.pad_image) - MEAN) / STD
    # torch's and cv2's nearest neighbour pick the same source pixel but for floating-point ties.
    assert (ours_label == theirs_label).mean() > 0.995
    # Bilinear on uint8 (cv2, 11-bit fixed-point weights, rounded to uint8) against float: at most 1.5 grey levels;
    # the pad is the mean rounded to uint8, at most 0.5 grey levels from 0 after normalisation.
    assert np.abs(ours_image - theirs_image).max() <= 1.5 / STD.min()


def test_ilm_assl_source_images_are_stretched_to_2048x1024_first():
    # The release resizes GTA5 (1914x1052) and SYNTHIA (1280x760) to exactly 2048x1024 (cityscapes_semi_cp.py:150,
    # 165) before RandResize: the scaled sizes are those of a 2048x1024 image.
    rule = UDADatasetMapper.from_config(_stal_cfg(), "source", load_label=True).rule
    for size in [(1052, 1914), (760, 1280), (1024, 2048)]:
        for v in (0.0, 0.37, 0.999):
            below = rule.sample(Scripted([0.2, v, 0, 0, 0.9]), size)
            above = rule.sample(Scripted([0.8, v, 0, 0, 0.9]), size)
            s_below, s_above = 0.5 + 0.5 * v, 1.0 + v
            assert below.resized_size == (int(1024 * s_below), int(2048 * s_below))
            assert above.resized_size == (int(1024 * s_above), int(2048 * s_above))


def test_ilm_assl_scale_law_and_padding_share():
    # RandResize draws below or above 1 with probability 1/2 each: median scale 1, and a quarter of the crops
    # padded (scale < 769/1024 happens with probability 0.5 * (0.751 - 0.5) / 0.5 = 0.25; the audit's 25%).
    rule = UDADatasetMapper.from_config(_stal_cfg(), "source", load_label=True).rule
    rng = np.random.default_rng(0)
    geometries = [rule.sample(rng, (1024, 2048)) for _ in range(2000)]
    scales = np.array([g.resized_size[1] / 2048 for g in geometries])
    assert {g.output_size for g in geometries} == {(769, 769)}
    assert abs(np.mean(scales < 1.0) - 0.5) < 0.04 and abs(np.median(scales) - 1.0) < 0.05
    assert scales.min() >= 0.5 and scales.max() <= 2.0
    assert abs(np.mean([g.padded for g in geometries]) - 0.25) < 0.03


# ------------------------------------------------------------------------------------------------ MCL
def _mcl_transform(image, label, img_size, resize, rcrop, draws):
    """feifei-cv/MCL@b91c947: the dataset's force-resize to ``img_size`` (gta5_dataset.py:145-146, PIL BILINEAR /
    NEAREST), then data/augmentations.py RandomSized(resize) (:422-449, PIL BILINEAR / NEAREST again),
    RandomCrop(rcrop) (:45-110) and RandomHorizontallyFlip, with ``random`` scripted by ``draws``: the crop box
    (y1, y2, x1, x2), the size, the image and the label."""
    script = list(draws)
    img = Image.fromarray(image).resize(img_size, Image.BILINEAR)
    lbl = Image.fromarray(label).resize(img_size, Image.NEAREST)
    prop = 1.0 * lbl.size[0] / lbl.size[1]
    w = int((0.5 + script.pop(0)) * resize)  # random.uniform(0.5, 1.5) * self.size
    h = int(w / prop)
    img, lbl = img.resize((w, h), Image.BILINEAR), lbl.resize((w, h), Image.NEAREST)
    tw, th = rcrop
    assert not (w < tw or h < th)  # the release's fallback (a resize to the crop) never runs at 2:1
    x1, y1 = script.pop(0), script.pop(0)  # random.randint(0, w - tw), random.randint(0, h - th)
    img, lbl = img.crop((x1, y1, x1 + tw, y1 + th)), lbl.crop((x1, y1, x1 + tw, y1 + th))
    if script.pop(0) < 0.5:
        img, lbl = img.transpose(Image.FLIP_LEFT_RIGHT), lbl.transpose(Image.FLIP_LEFT_RIGHT)
    return (y1, y1 + th, x1, x1 + tw), (h, w), np.array(img), np.array(lbl)


@pytest.mark.parametrize(
    "config, img_size, resize, rcrop",
    [
        ("configs/multi_target/mcl_warmup_gta5_to_cs_map_idd_7cls.yaml", (640, 320), 640, (320, 160)),
        ("configs/multi_target/mcl_warmup_gta5_to_cs_map_idd_19cls.yaml", (1024, 512), 1024, (512, 256)),
    ],
)
@pytest.mark.parametrize(
    "size",
    [(1052, 1914), (1080, 1920), (720, 1280), (3024, 4032), (1536, 2048), (2160, 3840), (1024, 2048)],
    ids=["gta5", "idd_1080p", "idd_720p", "mapillary_4x3", "mapillary_4x3_small", "mapillary_16x9", "cityscapes"],
)
def test_mcl_force_resize_random_size_and_crop_equal_the_release(config, img_size, resize, rcrop, size):
    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, config))
    label = _blocky_label(*size, block=max(size) // 4)
    image = np.random.default_rng(size[0]).integers(0, 256, size + (3,), dtype=np.uint8)  # every frequency
    for domain in ("source", "target"):
        mapper = UDADatasetMapper.from_config(cfg, domain, load_label=False)
        rule = mapper.rule
        assert rule.interpolation == "pil_bilinear" and rule.resample_twice
        draws = [(0.0, 0.0, 0.0, 0.9), (0.3, 0.5, 0.2, 0.1), (0.6137, 0.99, 0.99, 0.7), (0.999, 0.3, 1.0, 0.2)]
        for u, fx, fy, flip in draws[: 2 if domain == "target" else 4]:
            w = int((0.5 + u) * resize)
            h = int(w / 2.0)
            x1, y1 = int(fx * (w - rcrop[0])), int(fy * (h - rcrop[1]))
            script = [u, x1, y1, flip]
            box, scaled, their_image, their_label = _mcl_transform(image, label, img_size, resize, rcrop, script)
            # Ours: the factor u + 0.5 on the exact size, floor-rounded; the crop offsets and flip as drawn.
            geometry = rule.sample(Scripted([u, y1, x1, flip]), size)
            assert geometry.resized_size == scaled, (domain, u)
            top, left, ch, cw = geometry.crop
            assert (top, top + ch, left, left + cw) == box and geometry.flip == (flip < 0.5)
            # The same PIL resamplings, one after the other: equal images and labels.
            ours = apply_geometry(rule.stretched(label, True), geometry, True, interpolation=rule.interpolation)
            assert np.array_equal(ours, their_label)
            ours = apply_geometry(rule.stretched(image, False), geometry, False, interpolation=rule.interpolation)
            assert np.array_equal(ours, their_image)
    test_rule = UDADatasetMapper.from_config(cfg, "test", load_label=False).rule
    assert test_rule.base_size(size) == (img_size[1], img_size[0])  # evaluation inputs force-resized too
    assert test_rule.interpolation == "pil_bilinear"


def test_the_mcl_mapper_resamples_images_and_labels_as_the_release(tmp_path):
    # The mapper itself, on files: a GTA5-sized frame through the 7-class source rule, against _mcl_transform.
    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs/multi_target/mcl_warmup_gta5_to_cs_map_idd_7cls.yaml"))
    image = np.random.default_rng(5).integers(0, 256, (1052, 1914, 3), dtype=np.uint8)
    label = _blocky_label(1052, 1914, block=150, seed=2) % 7
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(label).save(tmp_path / "label.png")
    mapper = UDADatasetMapper.from_config(cfg, "source", load_label=True)
    u, x1, y1, flip = 0.3, 17, 5, 0.2
    d = mapper(
        {"file_name": str(tmp_path / "image.png"), "sem_seg_file_name": str(tmp_path / "label.png")},
        rng=Scripted([u, y1, x1, flip]),
    )
    _, _, their_image, their_label = _mcl_transform(image, label, (640, 320), 640, (320, 160), [u, x1, y1, flip])
    assert np.array_equal(d["image"].numpy().transpose(1, 2, 0), their_image)
    assert np.array_equal(d["sem_seg"].numpy(), their_label)


# ------------------------------------------------------------------------------------------------ DUDA
@pytest.mark.parametrize(
    "config, source_size, resize",
    [
        ("configs/synthia_cityscapes/duda_dlv2_r101.yaml", (760, 1280), (1024, 1820)),
        ("configs/gta5_cityscapes/duda_dlv2_r101.yaml", (1052, 1914), (1052, 1914)),
        ("configs/gta5_cityscapes/duda_dlv2_r101.yaml", (1054, 1914), (1052, 1914)),  # a GTA5 frame of another size
    ],
)
def test_duda_resize_scale_and_crop_equal_the_release(config, source_size, resize):
    # parquets/DUDA@4e8443c dataset/base_dataset.py:81-82 + augmentation.py: Resize (h, w) exactly (:72-84), then
    # RandomScale(0.51, 1.6) to int(scale * w) x int(scale * h) (:58-69), then RandomCrop(512, 896) (:13-36), which
    # has no padding: the smallest scale must still hold the crop.
    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, config))
    rule = UDADatasetMapper.from_config(cfg, "source", load_label=True).rule
    assert rule.crop_pad == "none" and rule.mixed_size_cause({source_size: "x.png"}) is None
    for v in (0.0, 0.2, 0.5, 0.999):
        scale = 0.51 + (1.6 - 0.51) * v
        g = rule.sample(Scripted([v, 0, 0, 0.9]), source_size)
        assert g.resized_size == (int(scale * resize[0]), int(scale * resize[1]))
        assert g.output_size == (512, 896)
    # The image and label themselves: the dataset's Resize (augmentation.py:72-84), then RandomScale (:58-69), both
    # PIL's Lanczos (Image.ANTIALIAS) for the image and NEAREST for the label, the crop (:29-31), the flip (:46).
    assert rule.interpolation == "lanczos" and rule.resample_twice
    image = np.random.default_rng(1).integers(0, 256, source_size + (3,), dtype=np.uint8)
    label = _blocky_label(*source_size, block=97)
    g = rule.sample(Scripted([0.3, 7, 11, 0.2]), source_size)
    (new_h, new_w), (y1, x1, th, tw) = g.resized_size, g.crop
    for array, is_label, resample in ((image, False, Image.LANCZOS), (label, True, Image.NEAREST)):
        theirs = Image.fromarray(array).resize((resize[1], resize[0]), resample)
        theirs = theirs.resize((new_w, new_h), resample).crop((x1, y1, x1 + tw, y1 + th))
        theirs = np.asarray(theirs.transpose(Image.FLIP_LEFT_RIGHT))
        ours = apply_geometry(rule.stretched(array, is_label), g, is_label, interpolation=rule.interpolation)
        assert np.array_equal(ours, theirs), (source_size, is_label)
    target = UDADatasetMapper.from_config(cfg, "target", load_label=False).rule
    assert target.base_size((1024, 2048)) == (1024, 2048) and target.mixed_size_cause({(1024, 2048): "c.png"}) is None


# ------------------------------------------------------------------------------------------------ mmseg
def test_keep_ratio_is_mmcv_rescale_size_and_pads_at_the_bottom_right():
    # mmcv.rescale_size(keep_ratio): scale = min(long / max(h, w), short / min(h, w)), sides int(x * scale + 0.5).
    def mmcv_rescale(h, w, scale):
        factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
        return int(h * factor + 0.5), int(w * factor + 0.5)

    for size, resize in [((1052, 1914), (720, 1280)), ((1052, 1914), (1440, 2560)), ((760, 1280), (1520, 2560))]:
        rule = GeometryRule(resize=resize, crop_size=(512, 512))
        assert rule.base_size(size) == mmcv_rescale(*size, (resize[1], resize[0]))
    # A crop larger than the image: mmseg's Pad(size=crop_size, pad_val=0, seg_pad_val=255) after RandomCrop.
    rule = GeometryRule(crop_size=(40, 64))
    g = rule.sample(np.random.default_rng(0), (30, 50))
    assert g.crop == (0, 0, 40, 64) and g.padded
    label = np.full((30, 50), 3, np.uint8)
    padded = apply_geometry(label, g, is_label=True)
    assert (padded[:30, :50] == 3).all() and (padded[30:] == 255).all() and (padded[:, 50:] == 255).all()
    image = apply_geometry(np.full((30, 50, 3), 9, np.uint8), g, is_label=False, pad_value=(124, 116, 104))
    assert image[35, 60].tolist() == [124, 116, 104] and image[0, 0].tolist() == [9, 9, 9]


def test_every_option_is_checked_naming_the_key():
    cfg = get_uda_cfg()
    cfg.INPUT.SOURCE.RESIZE_MODE = "stretch"
    with pytest.raises(ValueError, match=r"INPUT\.SOURCE\.RESIZE_MODE 'stretch' is not one of keep_ratio, exact"):
        UDADatasetMapper.from_config(cfg, "source", load_label=True)
    cfg = get_uda_cfg()
    cfg.INPUT.TARGET.RATIO_SAMPLING = "split_at_one"
    cfg.INPUT.TARGET.RATIO_RANGE = (1.2, 2.0)
    with pytest.raises(ValueError, match=r"INPUT\.TARGET\.RATIO_SAMPLING split_at_one needs RATIO_RANGE around 1"):
        UDADatasetMapper.from_config(cfg, "target", load_label=False)


# ------------------------------------------------------------------------------------------------ mixed sizes
def test_a_rule_that_can_mix_sizes_names_the_file_and_the_keys():
    rule = GeometryRule(
        resize=(320, 640), ratio_range=(0.5, 1.5), crop_size=(160, 320), crop_pad="none", key="INPUT.TARGET"
    )
    examples = {(1080, 1920): "idd/a.png", (3024, 4032): "map/b.jpg"}
    cause = rule.mixed_size_cause(examples)
    assert "'idd/a.png' (1080x1920) can be scaled to 160x284" in cause and "INPUT.TARGET.CROP_PAD is none" in cause
    assert GeometryRule(**{**rule.__dict__, "resize_mode": "exact"}).mixed_size_cause(examples) is None
    assert GeometryRule(**{**rule.__dict__, "crop_pad": "bottom_right"}).mixed_size_cause(examples) is None
    whole = GeometryRule(resize=(320, 640), key="INPUT.TARGET")
    assert "'idd/a.png' comes out at 320x569 and 'map/b.jpg' at 320x427" in whole.mixed_size_cause(examples)
    assert "scales each image differently" in GeometryRule(ratio_range=(0.5, 2.0)).mixed_size_cause(examples)


def test_a_mixed_batch_names_each_size_its_file_and_keys():
    def sample(name, crop):
        return {
            "image": torch.zeros(3, crop[0], crop[1], dtype=torch.uint8),
            "file_name": name,
            "input_config": "INPUT.SOURCE",
            "geometry": {"orig_size": [1052, 1914], "resized_size": [531, 966], "crop": [0, 0, *crop], "flip": False},
        }

    with pytest.raises(ValueError) as e:
        stack_images([sample("a.png", (531, 769)), sample("b.png", (769, 769))], torch.device("cpu"))
    message = str(e.value)
    assert "531x769 from 'a.png' (1052x1914 scaled to 531x966 by INPUT.SOURCE.RESIZE, RESIZE_MODE and RATIO" in message
    assert "769x769 from 'b.png'" in message and "CROP_SIZE and CROP_PAD" in message
    groups = size_groups([sample("a.png", (4, 6)), sample("b.png", (5, 6)), sample("c.png", (4, 6))])
    assert [[d["file_name"] for d in g] for g in groups] == [["a.png", "c.png"], ["b.png"]]


def test_mapper_pads_with_the_pixel_mean_and_records_its_rule(tmp_path):
    image_file, label_file = str(tmp_path / "i.png"), str(tmp_path / "l.png")
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(image_file)
    Image.fromarray(np.full((20, 30), 5, np.uint8)).save(label_file)
    cfg = get_uda_cfg()
    cfg.INPUT.SOURCE.CROP_SIZE = (32, 40)
    cfg.INPUT.SOURCE.CROP_PAD = "center"
    cfg.INPUT.SOURCE.FLIP_PROB = 0.0
    out = UDADatasetMapper.from_config(cfg, "source", load_label=True)(
        {"file_name": image_file, "sem_seg_file_name": label_file, "height": 20, "width": 30},
        rng=np.random.default_rng(0),
    )
    assert out["input_config"] == "INPUT.SOURCE" and out["image"].shape == (3, 32, 40)
    assert out["geometry"]["crop"] == [-6, -5, 32, 40]  # (32 - 20) // 2 rows and (40 - 30) // 2 columns before
    assert out["image"][:, 0, 0].tolist() == [124, 116, 104]  # round(PIXEL_MEAN): 0 after normalisation
    assert (out["sem_seg"][6:26, 5:35] == 5).all() and int(out["sem_seg"][0, 0]) == 255


# ------------------------------------------------------------------------------------------------ every paper config
# Real sizes of each dataset beyond the fabricated ones: Mapillary's smallest (1024x768) and a portrait frame.
EXTRA_REAL_SIZES = {"mapillary": [(768, 1024), (4000, 3000)], "gta5": [(1054, 1914)]}


def _paper_configs():
    for folder in ("gta5_cityscapes", "synthia_cityscapes", "multi_target"):
        root = os.path.join(REPO, "configs", folder)
        for name in sorted(os.listdir(root)):
            if name.endswith(".yaml") and not name.startswith("Base-"):
                yield os.path.join(folder, name)


@pytest.mark.parametrize("config", list(_paper_configs()))
def test_no_paper_config_can_mix_sizes_in_a_batch(config):
    """For every paper config and every dataset it trains on, images of every real size come out of its rule at one
    size: the start-up check that the loader makes (for per-process batches of 2 or more), here without the
    datasets."""
    from uda_plugins.data.datasets.fabricate import REAL_SIZES

    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", config))
    streams = [("source", tuple(cfg.DATASETS.SOURCE_TRAIN))]
    streams += [("target", (name,)) for name in cfg.DATASETS.TARGET_TRAIN]
    if cfg.DATASETS.TARGET_LABELED_LIST:  # labelled Cityscapes images join the source stream
        streams[0] = ("source", streams[0][1] + ("cityscapes_train",))
    for domain, names in streams:
        rule = UDADatasetMapper.from_config(cfg, domain, load_label=False).rule
        sizes = {}
        for name in names:
            family = name.split("_")[0]
            for size in [s for split in REAL_SIZES[family].values() for s in split] + EXTRA_REAL_SIZES.get(family, []):
                sizes.setdefault(tuple(size), f"{family} {size[1]}x{size[0]}")
        assert rule.mixed_size_cause(sizes) is None, (config, domain, rule.mixed_size_cause(sizes))
