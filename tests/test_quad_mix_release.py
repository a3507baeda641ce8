"""QuadMix's switches to the release (docs/release-audit/guidance-training-quadmix.md §2), each against a transcription
of ZHE-SAPI/UDASS@b0e44f7 ``image_udass/seg/mmseg/models/uda/ok/dacs_gta.py`` (``dacs_syn.py`` for SYNTHIA's list) at
the release's shapes:

* Q1 ``UDA.QUADMIX.PASTE_NORMALIZATION as_released``: rand_mixer's BGR, RGB-order means, / 255 (:225-228), and the
  colour jitter denormalising those objects with the model's statistics;
* Q2 ``UDA.QUADMIX.RESET_TEACHER``: teacher := student before the forward of the hard-coded resume iteration
  (:259, 511-515), the release's alpha after it, and an exact resume on either side of it;
* Q4 ``UDA.QUADMIX.RARE_OBJECTS_AS_RELEASED``: ``random.sample(list, 2)`` shared per iteration (:695-698), each object
  stretched to 2048x1024, a random 1024 crop, no flip, a new image until the crop holds > 50 pixels (:192-230).
"""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from test_quad_mix import _cfg, _loader_batches, _step

from uda_plugins.config import get_uda_cfg
from uda_plugins.d2 import DetectionCheckpointer, EventStorage, build_model
from uda_plugins.data.build import released_object_rule
from uda_plugins.data.mapper import UDADatasetMapper
from uda_plugins.data.samplers import SharedClassObjectSampler
from uda_plugins.data.strong_aug import apply_strong_aug, color_jitter, sample_strong_aug
from uda_plugins.data.transforms import resize_label
from uda_plugins.engine.step import split_batch
from uda_plugins.methods import self_training
from uda_plugins.methods.quad_mix_masks import released_paste_normalization

# ok/dacs_gta.py:47
IMG_MEAN = np.array((123.675, 116.28, 103.53), dtype=np.float32)
# mmseg's img_norm_cfg of every UDASS config (configs/udass/*.py), the paper configs' MODEL.PIXEL_MEAN / PIXEL_STD.
MMSEG_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
MMSEG_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
GTA_LIST = [3, 4, 5, 6, 12, 15, 16, 17, 18]  # ok/dacs_gta.py:696
SYNTHIA_LIST = [3, 3, 4, 4, 4, 4, 5, 5, 6, 7, 12, 13, 18]  # ok/dacs_syn.py:735

# The synthetic tiny pair as the release's geometry in miniature: 48x96 images stretched to 48x192, 96-wide crops.
AS_RELEASED_OBJECTS = {
    "UDA.QUADMIX.RARE_OBJECTS_AS_RELEASED": True,
    "UDA.QUADMIX.RARE_RESIZE": "(48, 192)",
    "INPUT.SOURCE.CROP_SIZE": "(48, 96)",
}


def rand_mixer_normalise(img: np.ndarray) -> np.ndarray:
    """ok/dacs_gta.py:209-228 after the crop: an HxWx3 uint8 RGB crop -> the 3xHxW float32 tensor pasted."""
    img = np.asarray(img, np.float32)
    img = img[:, :, ::-1].copy()  # change to BGR
    img -= IMG_MEAN
    return img.transpose((2, 0, 1)) / 255.0


# --------------------------------------------------------------------------------------------------------- Q1
def test_released_paste_normalization_is_rand_mixers_at_its_crop_size():
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)  # rand_mixer's 1024x1024 crop
    crop[0, 0] = (255, 0, 0)
    ours = released_paste_normalization(torch.from_numpy(crop).permute(2, 0, 1)[None].float())[0]
    # One float32 subtraction and one division per value on both sides, IEEE-rounded alike on every CPU: bit for bit.
    assert torch.equal(ours, torch.from_numpy(rand_mixer_normalise(crop)))
    np.testing.assert_allclose(ours[:, 0, 0], [-0.485, -0.456, 0.594], atol=5e-4)  # the audit's red
    red = (torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1) - MMSEG_MEAN) / MMSEG_STD  # every other image's red
    np.testing.assert_allclose(red.flatten(), [2.249, -2.036, -1.804], atol=1e-3)


def test_the_colour_jitter_denormalises_released_objects_with_the_models_statistics():
    """dacs_transforms_zz.py:63-80 (``color_jitter``): ``denorm_`` (x std + mean) / 255, kornia's ColorJitter,
    ``renorm_``, on the whole image, pasted objects included. Ours clamps the denormalised image to [0, 1] first; a
    released object denormalises strictly inside (0, 1) whatever its colour, so the clamp never acts and the jitter
    sees the release's low-contrast object (the jitter itself is the DACS family's, compared elsewhere)."""
    levels = torch.tensor([0.0, 1.0, 127.0, 128.0, 254.0, 255.0])
    rgb = torch.cartesian_prod(levels, levels, levels).T.reshape(1, 3, 1, -1)  # every channel's extremes, combined
    pasted = released_paste_normalization(rgb)
    seen = (pasted * MMSEG_STD + MMSEG_MEAN) / 255.0
    assert seen.min() > 0.31 and seen.max() < 0.61  # the audit's [0.31, 0.60]: a "ghost" in a narrow band
    for seed in range(5):
        torch.manual_seed(seed)
        params = sample_strong_aug(1, 0.2, 0.2, blur=False)
        params.jitter = True
        ours = apply_strong_aug(pasted, params, MMSEG_MEAN, MMSEG_STD)
        released = (color_jitter((pasted * MMSEG_STD + MMSEG_MEAN) / 255.0, params) * 255.0 - MMSEG_MEAN) / MMSEG_STD
        assert torch.equal(ours, released)


def _paste_dicts(n: int, per_image: int, size=(48, 96)) -> list:
    """The loader's rare objects for ``n`` target images: ``per_image`` blocks (paste_slot) of 2n objects."""
    g = torch.Generator().manual_seed(0)
    out = []
    for slot in range(per_image):
        for k in range(2 * n):
            out.append(
                {
                    "image": torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8),
                    "sem_seg": torch.full(size, 10 * slot + k, dtype=torch.long),
                    "rcs_class": 10 * slot + k,
                    "paste_slot": slot,
                    "input_config": "INPUT.SOURCE",
                }
            )
    return out


@pytest.mark.parametrize("normalization", ["model", "as_released"])
def test_rare_objects_reach_the_quad_images_normalised_as_configured(tmp_path, normalization):
    cfg = _cfg(tmp_path, **{"UDA.QUADMIX.PASTE_NORMALIZATION": normalization})
    model = build_model(cfg)
    dicts = _paste_dicts(n=2, per_image=2)
    images, labels, classes = model.rare_objects({"source_paste": dicts}, 2, (48, 96))
    assert images.shape == (2, 2, 2, 3, 48, 96) and labels.shape == (2, 2, 2, 48, 96) and classes.shape == (2, 2, 2)
    for i in range(2):
        for k in range(2):  # T2SS, T2ST of target image i
            for p in range(2):  # object p: block p of the loader's batch
                d = dicts[p * 4 + 2 * i + k]
                assert int(classes[i, k, p]) == d["rcs_class"] and torch.equal(labels[i, k, p], d["sem_seg"])
                rgb = d["image"][None].float()
                if normalization == "as_released":
                    expected = torch.from_numpy(rand_mixer_normalise(d["image"].permute(1, 2, 0).numpy()))
                else:
                    expected = ((rgb - MMSEG_MEAN) / MMSEG_STD)[0]
                torch.testing.assert_close(images[i, k, p], expected, rtol=0, atol=1e-6)
    shuffled = dicts[1:] + dicts[:1]
    with pytest.raises(ValueError, match="paste_slot"):
        model.rare_objects({"source_paste": shuffled}, 2, (48, 96))


# --------------------------------------------------------------------------------------------------------- Q2
def _move_student(model, it: int) -> None:
    """What the optimizer step of iteration ``it`` does to the student, as a function of ``it`` (and BatchNorm
    statistics moving too, which the reset must not copy)."""
    g = torch.Generator().manual_seed(1000 + it)
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        for name, b in model.student.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.1 * torch.randn(b.shape, generator=g))


def _release_teacher(teacher: list, student: list, it: int, resume_iter: int, alpha: float) -> list:
    """ok/dacs_gta.py:511-515 before the forward of iteration ``it`` (``local_iter`` starts at ``resume_iter``,
    :259): ``_init_ema_weights`` (:315-325, parameters only) at it == resume_iter, ``_update_ema(it)`` (:327-339)
    after."""
    if it == resume_iter:
        return [s.clone() for s in student]
    a = min(1 - 1 / (it + 1), alpha)
    return [a * t + (1 - a) * s for t, s in zip(teacher, student)]


def _params(module) -> list:
    return [p.detach().clone() for p in module.parameters()]


def _reset_cfg(tmp_path, reset=True, at=3):
    return _cfg(
        tmp_path,
        **{"UDA.QUADMIX.RESET_TEACHER": reset, "UDA.QUADMIX.RESET_TEACHER_ITER": at, "UDA.TEACHER.ALPHA": 0.999},
    )


def test_the_teacher_is_the_student_at_the_reset_iteration_then_averaged_as_released(tmp_path, monkeypatch):
    alphas = []
    update = self_training.ema_update_

    def recording(teacher, student, alpha):
        alphas.append(alpha)
        update(teacher, student, alpha)

    monkeypatch.setattr(self_training, "ema_update_", recording)
    model = build_model(_reset_cfg(tmp_path, at=3))
    model.init_teacher()
    teacher_buffers = {k: v.clone() for k, v in model.teacher.named_buffers()}
    released = None
    for it in range(7):
        _move_student(model, it)
        with EventStorage(it):
            model.update_teacher()  # the hook's after_step: the teacher iteration it + 1 sees
        if it + 1 >= 3:
            released = _release_teacher(released, _params(model.student), it + 1, 3, 0.999)
            ours = _params(model.teacher)
            if it + 1 == 3:  # right after the reset: the student's parameters exactly, its own BatchNorm statistics
                assert all(torch.equal(a, b) for a, b in zip(ours, released))
                for k, v in model.teacher.named_buffers():
                    if k.endswith("running_mean"):
                        assert torch.equal(v, teacher_buffers[k]), k
                        assert not torch.equal(v, dict(model.student.named_buffers())[k])
            # a t + (1 - a) s as the release computes it, or as t + (1 - a) s after t *= a here: each of the <= 4
            # updates rounds to within 2 float32 ulps of the magnitude differently, whatever the CPU.
            for a, b in zip(ours, released):
                bound = 8 * torch.finfo(torch.float32).eps * max(a.abs().max().item(), 1.0)
                torch.testing.assert_close(a, b, rtol=0, atol=bound)
    # The updates after iterations 0, 1 (MIC's ramp), none after 2 (the reset), then the release's alpha of it + 1.
    assert alphas == [min(1 - 1 / (it + 2), 0.999) for it in (0, 1, 3, 4, 5, 6)]
    assert int(model.ema_updates) == 7


def test_at_the_papers_resume_iteration_the_alpha_is_at_once_0999(tmp_path, monkeypatch):
    alphas = []
    monkeypatch.setattr(self_training, "ema_update_", lambda t, s, a: alphas.append(a))
    model = build_model(_reset_cfg(tmp_path, at=4000))
    model.ema_updates.fill_(3999)  # a run from iteration 0: 3999 updates before the step of iteration 3999
    for it in (3999, 4000):
        with EventStorage(it):
            model.update_teacher()
    assert all(torch.equal(a, b) for a, b in zip(_params(model.teacher), _params(model.student)))
    assert alphas == [0.999] and min(1 - 1 / (4001 + 1), 0.999) == 0.999  # the release's _update_ema(4001)


def test_without_the_switch_the_teacher_carries_on(tmp_path):
    model = build_model(_reset_cfg(tmp_path, reset=False))
    model.init_teacher()
    for it in range(3):
        _move_student(model, it)
        with EventStorage(it):
            model.update_teacher()
    assert not any(torch.equal(a, b) for a, b in zip(_params(model.teacher), _params(model.student)))


@pytest.mark.parametrize("saved_after", [1, 2])  # the checkpoint before the reset, and the one that holds it
def test_a_resume_across_the_reset_is_exact(tmp_path, saved_after):
    cfg = _reset_cfg(tmp_path, at=3)
    full = build_model(cfg)
    full.init_teacher()
    path = str(tmp_path / "model.pth")
    for it in range(6):
        _move_student(full, it)
        with EventStorage(it):
            full.update_teacher()
        if it == saved_after:
            torch.save({"model": full.state_dict()}, path)
    resumed = build_model(cfg)
    DetectionCheckpointer(resumed).load(path)
    resumed.init_teacher()  # the hook's before_train: keeps a teacher that has been updated
    for it in range(saved_after + 1, 6):
        _move_student(resumed, it)
        with EventStorage(it):
            resumed.update_teacher()
    a, b = full.state_dict(), resumed.state_dict()
    for key in a:
        if key.startswith(("teacher.", "student.", "ema_updates")):
            assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------------------------------------- Q4
def _sampler(class_list, pixels=None, sizes=None, slots=2, min_pixels=50):
    pixels = np.full((4, 19), 1000) if pixels is None else pixels
    sizes = [(1052, 1914)] * len(pixels) if sizes is None else sizes
    cfg = get_uda_cfg()
    cfg.INPUT.SOURCE.CROP_SIZE = (1024, 1024)  # the release's crop and stretch (the config's defaults)
    return SharedClassObjectSampler(pixels, sizes, class_list, slots, released_object_rule(cfg), min_pixels)


@pytest.mark.parametrize("class_list", [GTA_LIST, SYNTHIA_LIST])
def test_each_iteration_draws_distinct_list_entries_as_random_sample(class_list):
    """``random.sample(class_to_select, 2)``: each ordered pair of distinct list positions with probability
    1 / (L (L - 1)); SYNTHIA's repeats make a class pair like (4, 4) possible, never one of a class listed once."""
    sampler = _sampler(class_list)
    n = 20_000
    drawn = Counter(tuple(sampler.iteration_classes(np.random.default_rng([0, 51, it]))) for it in range(n))
    size = len(class_list)
    expected = Counter()
    for a in range(size):
        for b in range(size):
            if a != b:
                expected[(class_list[a], class_list[b])] += 1 / (size * (size - 1))
    assert set(drawn) <= set(expected)
    for pair, p in expected.items():  # 4.5 binomial standard deviations: the draws are seeded, so this is fixed
        assert abs(drawn[pair] / n - p) < 4.5 * math.sqrt(p * (1 - p) / n), pair
    if class_list is SYNTHIA_LIST:
        assert drawn[(4, 4)] > 0 and (6, 6) not in drawn


def test_objects_share_the_iterations_classes_and_have_the_released_geometry(tmp_path):
    cfg = _cfg(tmp_path, **AS_RELEASED_OBJECTS, **{"UDA.QUADMIX.RARE_CLASSES": "(5, 7, 11)"})
    batches = _loader_batches(cfg, count=12)
    pairs = []
    for batch in batches[2:]:
        objects = batch["source_paste"]
        assert [d["paste_slot"] for d in objects] == [0] * 4 + [1] * 4  # 2 targets x (T2SS, T2ST), per object slot
        first, second = {d["rcs_class"] for d in objects[:4]}, {d["rcs_class"] for d in objects[4:]}
        assert len(first) == len(second) == 1 and first != second  # shared, and two distinct entries of the list
        pairs.append((first.pop(), second.pop()))
        for d in objects:
            top, left, height, width = d["geometry"]["crop"]
            assert d["geometry"]["resized_size"] == [48, 192] and (top, height, width) == (0, 48, 96)
            assert 0 <= left <= 96 and d["geometry"]["flip"] is False
            assert (d["sem_seg"] == d["rcs_class"]).sum() > 10  # RARE_MIN_PIXELS of the synthetic config
            # rand_mixer (:199-208): PIL resize to (W, H) with BILINEAR / NEAREST, then the crop.
            image = np.array(Image.open(d["file_name"]).convert("RGB").resize((192, 48), Image.BILINEAR))
            assert torch.equal(d["image"], torch.from_numpy(image[:, left : left + 96]).permute(2, 0, 1))
    assert len(set(pairs)) > 1
    again = _loader_batches(cfg, start=5, count=1)[0]["source_paste"]  # a function of position: resumes exactly
    for a, b in zip(batches[5]["source_paste"], again):
        assert (
            a["file_name"] == b["file_name"] and a["geometry"] == b["geometry"] and torch.equal(a["image"], b["image"])
        )


def test_every_process_and_micro_batch_gets_whole_blocks_of_the_shared_classes(tmp_path):
    cfg = _cfg(tmp_path, **AS_RELEASED_OBJECTS)
    from uda_plugins.data.build import build_uda_train_loader
    from uda_plugins.methods.quad_mix import QuadMix

    stream = build_uda_train_loader(cfg, QuadMix.data_requirements).dataset.extras["source_paste"]
    one = stream.batch(3, 0, 1)
    two = [stream.batch(3, rank, 2) for rank in range(2)]
    for rank, share in enumerate(two):
        assert [d["paste_slot"] for d in share] == [0, 0, 1, 1]  # one target image per process: its 2 quad images
        for d, same in zip(share, one[rank::2]):  # the strided positions of the single process
            assert d["file_name"] == same["file_name"] and d["geometry"] == same["geometry"]
    for micro in split_batch({"source_paste": one}, 2):  # gradient accumulation instead of processes
        assert [d["paste_slot"] for d in micro["source_paste"]] == [0, 0, 1, 1]
    classes = [{d["rcs_class"] for d in one if d["paste_slot"] == p} for p in range(2)]
    assert all(len(c) == 1 for c in classes)


def _gta_label(columns: int = 0, everywhere: bool = False, pixels: int = 0) -> np.ndarray:
    """A 1052x1914 GTA5 label of road (0) with class 16 (train) in ``columns`` columns at the left edge of 10 rows,
    everywhere in the lower half, or in ``pixels`` single pixels."""
    label = np.zeros((1052, 1914), np.uint8)
    if columns:
        label[500:510, :columns] = 16
    if everywhere:
        label[526:] = 16
    label.flat[:pixels] = 16
    return label


def test_at_gta5s_size_an_object_is_stretched_cropped_and_never_flipped_as_released(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1052, 1914, 3), dtype=np.uint8)
    label = _gta_label(everywhere=True)
    Image.fromarray(image).save(tmp_path / "00001.png")
    Image.fromarray(label).save(tmp_path / "00001_labelTrainIds.png")
    dicts = [
        {
            "file_name": str(tmp_path / "00001.png"),
            "sem_seg_file_name": str(tmp_path / "00001_labelTrainIds.png"),
            "height": 1052,
            "width": 1914,
        }
    ]
    pixels = np.full((1, 19), 1000, np.int64)  # the list's other classes, not drawn here
    pixels[0, 16] = (label == 16).sum()
    sampler = _sampler(GTA_LIST, pixels=pixels, sizes=[(1052, 1914)])
    mapper = UDADatasetMapper(is_train=True, rule=sampler.rule, num_classes=19, load_label=True)
    draw = np.random.default_rng([3, 50, 7])
    index, geometry = sampler.draw(draw, 16, lambda i: mapper.read_label(dicts[i]))
    sample = mapper(dicts[index], rng=draw, geometry=geometry)
    # rand_mixer.mix (:199-208) and RandomCrop_gta (:142-160): x1 = randint(0, 2048 - 1024), y1 = randint(0, 0).
    img = np.array(Image.open(dicts[0]["file_name"]).resize((2048, 1024), Image.BILINEAR), dtype=np.uint8)
    lbl = np.array(Image.open(dicts[0]["sem_seg_file_name"]).resize((2048, 1024), Image.NEAREST), dtype=np.uint8)
    top, x1, height, width = geometry.crop
    assert (top, height, width, geometry.flip) == (0, 1024, 1024, False) and 0 <= x1 <= 1024
    # The release maps GTA5's raw ids after its NEAREST resize; the prepared trainIds are mapped before: the same.
    assert torch.equal(sample["image"], torch.from_numpy(img[:, x1 : x1 + 1024]).permute(2, 0, 1))
    assert torch.equal(sample["sem_seg"], torch.from_numpy(lbl[:, x1 : x1 + 1024]).long())
    # The crop offset is uniform over every column of the stretched image, with no flip, ever.
    offsets = [sampler.rule.sample(np.random.default_rng([1, k]), (1052, 1914)) for k in range(3000)]
    lefts = np.array([g.crop[1] for g in offsets])
    assert not any(g.flip for g in offsets) and {g.crop[0] for g in offsets} == {0}
    assert lefts.min() <= 5 and lefts.max() >= 1019 and abs(lefts.mean() - 512) < 4.5 * 296 / math.sqrt(3000)


def test_a_missed_crop_draws_a_new_image_as_released():
    """rand_mixer loops ``random.sample(ids2img[c], 1)``, read, stretch, crop, until the crop holds > 50 pixels:
    rejection sampling over (image, crop), so an image is kept in proportion to its share of passing crops. Image 0
    has the class in a 40-column strip at its left edge (a few crops pass), image 1 in its lower half (every crop),
    image 2 in 2 pixels (no crop can: it is not even drawn)."""
    labels = [_gta_label(columns=40), _gta_label(everywhere=True), _gta_label(pixels=2)]
    pixels = np.full((3, 19), 1000, np.int64)  # the list's other classes, not drawn here
    pixels[:, 16] = [(lbl == 16).sum() for lbl in labels]
    sampler = _sampler(GTA_LIST, pixels=pixels)
    assert sampler.images_with_class(16).tolist() == [0, 1]  # 2 pixels become at most 2 x 1 x 2 = 4 <= 50
    stretched = resize_label(labels[0], (1024, 2048), "pil_bilinear")
    per_column = np.concatenate([[0], np.cumsum((stretched == 16).sum(axis=0))])
    passing = np.mean([per_column[x + 1024] - per_column[x] > 50 for x in range(1025)])  # P(crop passes | image 0)
    assert 0 < passing < 0.1
    n = 400
    kept = [sampler.draw(np.random.default_rng([5, k]), 16, lambda i: labels[i])[0] for k in range(n)]
    p = passing / (passing + 1.0)  # image 1's crops always pass
    assert abs(np.mean(np.array(kept) == 0) - p) < 4.5 * math.sqrt(p * (1 - p) / n)
    assert 2 not in kept


def test_a_phase_b_step_runs_with_every_switch_as_released(tmp_path):
    cfg = _cfg(
        tmp_path,
        **AS_RELEASED_OBJECTS,
        **{
            "UDA.QUADMIX.PASTE_NORMALIZATION": "as_released",
            "UDA.QUADMIX.REFERENCE_QUIRKS": True,
            "UDA.QUADMIX.RESET_TEACHER": True,
            "UDA.QUADMIX.RESET_TEACHER_ITER": 2,
        },
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    model.init_teacher()
    for it, batch in enumerate(_loader_batches(cfg, count=4)):
        losses = _step(model, batch, it)
        assert all(torch.isfinite(v) for v in losses.values())
        assert ("loss_quad_ss" in losses) == (it >= 2)
        with EventStorage(it):
            model.update_teacher()
        if it == 1:
            assert all(torch.equal(a, b) for a, b in zip(_params(model.teacher), _params(model.student)))


def test_the_released_geometry_needs_a_crop_inside_the_stretch():
    cfg = get_uda_cfg()
    cfg.INPUT.SOURCE.CROP_SIZE = (1024, 1024)
    assert released_object_rule(cfg).resize == (1024, 2048)
    cfg.UDA.QUADMIX.RARE_RESIZE = (512, 1024)
    with pytest.raises(ValueError, match="UDA.QUADMIX.RARE_RESIZE"):
        released_object_rule(cfg)
    with pytest.raises(ValueError, match="distinct entries"):
        _sampler([3], slots=2)
