"""STAL's data side as released (docs/release-audit/stal-ilm-assl.md A4, B1): the paste samples (a second labelled
sample at its own scale, read raw for GTA5/SYNTHIA as the release's img_loader reads it) and the unlabelled stream
without the labelled targets, against transcriptions of licongguan/ILM-ASSL@d10fd0f at the release's shapes."""

import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_overrides
from PIL import Image
from test_geometry_rules import MEAN, STD, Scripted, _blocky_label, _ilm_assl_transform, _image

from uda_plugins.config import get_uda_cfg
from uda_plugins.d2 import EventStorage, build_model
from uda_plugins.data.build import build_labelled_paste_stream, build_uda_train_loader, get_dataset_dicts
from uda_plugins.data.datasets.common import read_label_as_grey
from uda_plugins.data.labels import cityscapes_labelid_to_trainid
from uda_plugins.methods.semi_supervised import copy_paste

STAL_SYNTHETIC = os.path.join(REPO, "configs", "synthetic", "stal.yaml")
STAL_PAPER = os.path.join(REPO, "configs", "gta5_cityscapes", "stal_dlv3p_r101_1pct.yaml")
# Cityscapes' colours by labelId (cityscapesscripts), which GTA5's label PNGs use as their palette (GTA5's labels are
# palette PNGs whose indices are labelIds; CQFIO/PhotographicImageSynthesis#17: "they are the same").
QUERY_CANDIDATES = [c for c in range(19) if c not in (0, 1, 2, 8, 10)]  # ADAPTIVE_CLASSES_IGNORED as released


def _cityscapes_palette() -> list:
    from cityscapesscripts.helpers.labels import labels

    palette = [0] * 768
    for label in labels:
        if 0 <= label.id < 256:
            palette[3 * label.id : 3 * label.id + 3] = list(label.color)
    return palette


def _gta5_frame(folder, h=1052, w=1914, seed=0) -> dict:
    """A GTA5 frame at its real size: image, raw label (a palette PNG of labelIds with Cityscapes' colours) and the
    prepared trainId label, with the dict the library's GTA5 loader makes."""
    os.makedirs(folder, exist_ok=True)
    ids = np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 30, 31, 32, 33], np.uint8)
    raw = ids[_blocky_label(h, w, block=96, seed=seed) % len(ids)]
    image_file, raw_file = os.path.join(folder, "00001.png"), os.path.join(folder, "00001_raw.png")
    Image.fromarray(_image(h, w)).save(image_file)
    palette_png = Image.frombytes("P", (w, h), raw.tobytes())
    palette_png.putpalette(_cityscapes_palette())
    palette_png.save(raw_file)
    train_file = os.path.join(folder, "00001_labelTrainIds.png")
    Image.fromarray(cityscapes_labelid_to_trainid()[raw].astype(np.uint8)).save(train_file)
    return dict(file_name=image_file, sem_seg_file_name=train_file, raw_sem_seg_file_name=raw_file, height=h, width=w)


def _paper_cfg(**values):
    cfg = get_uda_cfg()
    cfg.merge_from_file(STAL_PAPER)
    for key, value in values.items():
        cfg.merge_from_list([key, str(value)])
    return cfg


# ------------------------------------------------------------------------------------------------ A4: the paste
@pytest.mark.parametrize(
    "below, v, flip, h_off, w_off",
    [
        (0.2, 0.05, 0.9, 0, 0),  # scale 0.145: 152x277, padded to 769 both ways
        (0.3, 0.7, 0.1, 0, 300),  # scale 0.73: 767x1397, 2 rows of padding, flipped
        (0.8, 0.6, 0.6, 500, 1700),  # scale 1.6: 1683x3062
    ],
)
def test_a_gta5_paste_sample_is_read_raw_at_its_own_scale_as_released(tmp_path, below, v, flip, h_off, w_off):
    # cityscapes_semi_cp.py:185-190: the paste image is read with img_loader(.., "RGB") at its file's size (GTA5's
    # 1914x1052, not stretched to 2048x1024 as the labelled sample is at :150) and its label with img_loader(.., "L"),
    # bypassing the id map of :156-161; then the paste transform (:245,293): RandResize(acp.rand_resize [0.1, 2.0]),
    # flip, Crop(769, rand).
    d = _gta5_frame(str(tmp_path))
    stream = build_labelled_paste_stream(_paper_cfg(**{"UDA.STAL.PASTE_RAW_SOURCE_LABELS": True}), [d], seed=0)
    image = np.array(Image.open(d["file_name"]).convert("RGB"))
    grey = np.array(Image.open(d["raw_sem_seg_file_name"]).convert("L"))  # the release's paste label
    theirs_image, theirs_label, (rh, rw) = _ilm_assl_transform(
        image, grey, [below, v, flip, h_off, w_off], scale=(0.1, 2.0)
    )
    # Ours crops, then flips (tests/test_geometry_rules.py: the left offset mirrored in the padded width).
    left = max(rw, 769) - 769 - w_off if flip < 0.5 else w_off
    sample = stream._paste_sample(d, Scripted([below, v, h_off, left, flip]))
    assert sample["geometry"]["resized_size"] == [rh, rw] == [int(1052 * sample_scale(below, v)), rw]
    ours_label = sample["sem_seg"].numpy()
    # torch's and cv2's nearest neighbour pick the same source pixel but for floating-point ties.
    assert (ours_label == theirs_label).mean() > 0.995
    ours_image = (sample["image"].permute(1, 2, 0).numpy() - MEAN) / STD
    # cv2's bilinear on uint8 against torch's on float: at most 1.5 grey levels (test_geometry_rules' bound).
    assert np.abs(ours_image - theirs_image).max() <= 1.5 / STD.min()
    # The values are grey levels of the palette colours: GTA5's cars (labelId 26, colour (0, 0, 142)) read 16.
    car = np.asarray(Image.open(d["raw_sem_seg_file_name"])) == 26
    assert np.unique(grey[car]).tolist() == [16]


def sample_scale(below: float, v: float, lo: float = 0.1, hi: float = 2.0) -> float:
    return lo + (1 - lo) * v if below < 0.5 else 1 + (hi - 1) * v


def test_with_the_fix_a_paste_sample_is_stretched_and_mapped_like_the_labelled_ones(tmp_path):
    d = _gta5_frame(str(tmp_path))
    stream = build_labelled_paste_stream(_paper_cfg(**{"UDA.STAL.PASTE_RAW_SOURCE_LABELS": False}), [d], seed=0)
    sample = stream._paste_sample(d, Scripted([0.8, 0.6, 500, 1700, 0.6]))
    assert sample["geometry"]["resized_size"] == [int(1024 * 1.6), int(2048 * 1.6)]  # from 2048x1024
    assert set(np.unique(sample["sem_seg"].numpy())) <= set(range(19)) | {255}  # trainIds


def test_as_released_gta5_pastes_only_cars_as_trains_and_trailers_as_cars(tmp_path):
    # What the release's raw paste labels select: a query class c takes the pixels whose palette colour has grey level
    # c. Of all Cityscapes colours only car's (16 = train) and trailer's (13 = car) are query classes; every other
    # GTA5 pixel is never pasted. SYNTHIA's 16-bit labels read as their high bytes: all 0, so nothing is pasted.
    ids = np.arange(34, dtype=np.uint8)[None]
    png = Image.frombytes("P", (34, 1), ids.tobytes())
    png.putpalette(_cityscapes_palette())
    png.save(tmp_path / "gta5.png")
    grey = read_label_as_grey(str(tmp_path / "gta5.png"))[0]
    assert {int(i): int(g) for i, g in zip(ids[0], grey) if g in QUERY_CANDIDATES} == {26: 16, 30: 13}
    synthia = np.zeros((760, 1280, 3), np.uint16)
    synthia[..., 2] = _blocky_label(760, 1280) + 1  # the class id in the PNG's first channel (cv2 writes BGR)
    synthia[..., 1] = np.arange(1280, dtype=np.uint16)[None] % 200  # instance ids below 256
    cv2.imwrite(str(tmp_path / "synthia.png"), synthia)
    assert not read_label_as_grey(str(tmp_path / "synthia.png")).any()
    labels = torch.randint(0, 19, (1, 769, 769))
    images = torch.randn(1, 3, 769, 769)
    paste = torch.zeros(1, 769, 769, dtype=torch.long)
    assert torch.equal(copy_paste(images, labels, images + 1, paste, QUERY_CANDIDATES)[1], labels)


def _release_dynamic_copy_paste(images_sup, labels_sup, paste_imgs, paste_labels, query_cat):
    """licongguan/ILM-ASSL@d10fd0f core/utils/utils.py:511-537 (``dynamic_copy_paste``), after the chunking."""
    compose_imgs, compose_labels = [], []
    for idx in range(images_sup.shape[0]):
        paste_label, image_sup, label_sup = paste_labels[idx], images_sup[idx], labels_sup[idx]
        if torch.sum(paste_label) == 0:
            compose_imgs.append(image_sup.unsqueeze(0))
            compose_labels.append(label_sup.unsqueeze(0))
        else:
            alpha = torch.zeros_like(paste_label).int()
            for cat in query_cat:
                alpha = alpha.__or__((paste_label == cat).int())
            alpha = (alpha > 0).int()
            compose_imgs.append(((1 - alpha) * image_sup + alpha * paste_imgs[idx]).unsqueeze(0))
            compose_labels.append(((1 - alpha) * label_sup + alpha * paste_label).unsqueeze(0))
    return torch.cat(compose_imgs), torch.cat(compose_labels)


def test_copy_paste_equals_the_release_on_raw_paste_labels_at_its_shapes():
    # One GPU's batch as released: 4 labelled 769x769 crops, two with a paste (grey levels as a GTA5 sample gives them,
    # padded with 0), two without (all zero); three query classes.
    g = torch.Generator().manual_seed(0)
    images, paste_images = torch.randn(4, 3, 769, 769, generator=g), torch.randn(4, 3, 769, 769, generator=g)
    labels = torch.randint(0, 19, (4, 769, 769), generator=g)
    greys = torch.tensor([0, 16, 13, 90, 120, 70, 195, 84])
    paste_labels = greys[torch.randint(0, len(greys), (4, 769, 769), generator=g)]
    paste_labels[1:3] = 0
    query = [16, 5, 13]
    theirs = _release_dynamic_copy_paste(images, labels, paste_images, paste_labels, query)
    ours = copy_paste(images, labels, paste_images, paste_labels, query)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def _synthetic_cfg(tmp_path, **extra):
    """The synthetic STAL config with the release's crop rule scaled to the tiny 48x96 images: 32x32 crops padded in
    the centre at a scale from [0.5, 1] or [1, 2], so that the paste samples can come at their own scale."""
    cfg = get_uda_cfg()
    cfg.merge_from_file(STAL_SYNTHETIC)
    values = {
        "DATASETS.TARGET_LABELED_LIST": "random:4",
        "UDA.STAL.OHEM_MIN_KEPT": 200,
        "UDA.STAL.PASTE_PARTNER": "second_sample",
        "UDA.STAL.COPY_PASTE_PROB": 0.5,
        "INPUT.SOURCE.CROP_SIZE": "(32, 32)",
        "INPUT.SOURCE.CROP_PAD": "center",
        "INPUT.SOURCE.RATIO_RANGE": "(0.5, 2.0)",
        "INPUT.SOURCE.RATIO_SAMPLING": "split_at_one",
        "INPUT.TARGET.CROP_SIZE": "(32, 32)",
        "SOLVER.IMS_PER_BATCH_SOURCE": 4,
    }
    values.update(extra)
    cfg.merge_from_list(tiny_overrides(str(tmp_path / "out"), **values))
    return cfg


def test_the_paste_stream_draws_half_the_samples_uniformly_as_a_function_of_position(tmp_path):
    cfg = _synthetic_cfg(tmp_path)
    model = build_model(cfg).train()
    loader = build_uda_train_loader(cfg, model.data_requirements)
    stream = loader.dataset.extras["labelled_paste"]
    source = loader.dataset.source
    assert stream.global_batch == source.global_batch and len(stream.dataset) == len(source.dataset)
    drawn = [s for it in range(100) for s in stream.batch(it, 0, 1)]
    pasted = [s for s in drawn if s["pasted"]]
    # 400 draws with P = 0.5: 4 standard deviations are 40.
    assert abs(len(pasted) - 200) < 40 and all("image" not in s for s in drawn if not s["pasted"])
    assert {s["image"].shape[-2:] for s in pasted} == {(32, 32)}
    # Uniform over the labelled pool with replacement (the release's random.randint): every entry comes up.
    assert {s["dataset_index"] for s in pasted} == set(range(len(source.dataset)))
    # A function of the position: the same on a second read and split over two processes.
    again = stream.batch(7, 0, 1)
    halves = stream.batch(7, 0, 2) + stream.batch(7, 1, 2)
    key = [(s["pasted"], s.get("dataset_index"), s.get("geometry")) for s in again]
    assert key == [(s["pasted"], s.get("dataset_index"), s.get("geometry")) for s in drawn[28:32]]
    assert sorted(map(str, key)) == sorted(
        str((s["pasted"], s.get("dataset_index"), s.get("geometry"))) for s in halves
    )


def test_the_model_pastes_the_loaders_second_samples(tmp_path):
    cfg = _synthetic_cfg(tmp_path)
    model = build_model(cfg).train()
    batch = next(iter(build_uda_train_loader(cfg, model.data_requirements)))
    images, labels = model.images_and_labels(batch["source"])
    paste_images, paste_labels = model._paste_samples(batch, images, labels)
    for k, d in enumerate(batch["labelled_paste"]):
        if d["pasted"]:
            assert torch.equal(paste_labels[k], d["sem_seg"])
            assert torch.allclose(paste_images[k], model.student.normalize(d["image"][None].float())[0])
        else:  # the release's all-zero paste: nothing is pasted
            assert not paste_labels[k].any() and not paste_images[k].any()
    model.group_sizes = (2, 1)  # the per-GPU statistics (B10) in a whole step
    with EventStorage(0):
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    model.group_sizes = (3, 1)
    with pytest.raises(ValueError, match="UDA.STAL.LABELED_GROUP_SIZE 3"), EventStorage(0):
        model(batch)
    with pytest.raises(ValueError, match="batch\\['labelled_paste'\\]"):
        model._paste_samples({"source": batch["source"]}, images, labels)
    with pytest.raises(ValueError, match="UDA.STAL.PASTE_PARTNER batch"):  # inputs not cropped to one size
        uncropped = _synthetic_cfg(tmp_path, **{"INPUT.SOURCE.CROP_SIZE": "(0, 0)"})
        build_uda_train_loader(uncropped, model.data_requirements)


# ------------------------------------------------------------------------------------- B1: the unlabelled set
@pytest.mark.parametrize("exclude", [False, True])
def test_unlabelled_stream_and_cutmix_partners_leave_out_the_labelled_targets(tmp_path, exclude):
    # B1: ILM-ASSL's unlabelled set is unlabeled.txt, the complement of labeled.txt (cityscapes_semi_cp.py:320-326),
    # and its CutMix bank and partners index that set only. DATASETS.TARGET_EXCLUDE_LABELED reproduces it; without it
    # every target image is also an unlabelled one.
    from uda_plugins.data.build import image_subset

    cfg = get_uda_cfg()
    cfg.merge_from_file(STAL_SYNTHETIC)
    values = {"DATASETS.TARGET_LABELED_LIST": "random:4", "DATASETS.TARGET_EXCLUDE_LABELED": exclude}
    cfg.merge_from_list(tiny_overrides(str(tmp_path / "out"), **values, **{"SOLVER.IMS_PER_BATCH_TARGET": 4}))
    model = build_model(cfg).train()
    loader = build_uda_train_loader(cfg, model.data_requirements)
    loader.serve_banks_of(model)  # as the trainer does: the model learns the stream's images
    dicts = get_dataset_dicts(["synthetic_tiny_target_train"])
    labelled = set(image_subset("random:4", dicts, cfg.SEED))
    stream = loader.dataset.targets[0]
    seen = {d["dataset_index"] for it in range(12) for d in stream.batch(it, 0, 1)}
    if exclude:
        assert stream.indices == [i for i in range(len(dicts)) if i not in labelled]
        assert not seen & labelled and len(seen) > len(labelled)
        assert model.cutmix_pool.tolist() == [i not in labelled for i in range(len(dicts))]
    else:
        assert stream.indices is None and model.cutmix_pool is None
        assert seen & labelled  # 48 draws of 12 images: every image comes up
    # the dataset_index of a sample still names its image in the whole dataset (the bank's column)
    sample = stream.batch(0, 0, 1)[0]
    assert sample["file_name"] == dicts[sample["dataset_index"]]["file_name"]
    partners = []
    real_partner = model._partner
    model._partner = lambda index: partners.append(index) or real_partner(index)
    target = next(iter(loader))["target"][0]
    for k in range(12):  # a bank of every class for every image, then none: the fallback draws from the pool too
        torch.manual_seed(k)
        model.cutmix_bank.fill_(k % 2)
        model._mixed_unlabelled(target)
    assert len(partners) == 48 and bool(set(partners) & labelled) != exclude


# ------------------------------------------------------------------------------------- B10: per-GPU statistics
def _group_model(tmp_path, labelled: int, unlabelled: int):
    cfg = get_uda_cfg()
    cfg.merge_from_file(STAL_SYNTHETIC)
    values = {"DATASETS.TARGET_LABELED_LIST": "random:4", "UDA.STAL.OHEM_MIN_KEPT": 100000}
    values.update({"UDA.STAL.LABELED_GROUP_SIZE": labelled, "UDA.STAL.UNLABELED_GROUP_SIZE": unlabelled})
    cfg.merge_from_list(tiny_overrides(str(tmp_path / "out"), **values))
    return build_model(cfg).train()


def test_ohem_keeps_its_minimum_per_gpu_group_as_released(tmp_path):
    # loss_helper.py:564-593 runs on each GPU's 4 labelled 769x769 crops: at least 100000 of their 2.37M pixels. A
    # process standing for 2 GPUs (8 images) with LABELED_GROUP_SIZE 4 mines each group on its own and averages the
    # two losses (DDP averages the GPUs' gradients); over all 8 the minimum is 100000 of 4.7M. Group 0 is confident
    # (few pixels below 0.7: the 100000-th lowest probability sets the threshold), group 1 is not (0.7 does).
    from test_semi_supervised import _reference_ohem

    from uda_plugins.methods.semi_supervised import label_probability

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 19, (8, 769, 769), generator=g)
    labels[:, :40] = 255
    logits = torch.randn(8, 19, 769, 769, generator=g)
    boost = torch.tensor([6.0] * 4 + [0.5] * 4).view(8, 1, 1, 1) * F.one_hot(labels.clamp(max=18), 19).permute(
        0, 3, 1, 2
    )
    logits += boost
    probability = label_probability(logits, labels, 19)
    per_gpu = [_reference_ohem(logits[k : k + 4], labels[k : k + 4].clone()) for k in (0, 4)]
    whole = _reference_ohem(logits, labels.clone())
    grouped = _group_model(tmp_path, 4, 1)._supervised(logits, logits, labels, probability)
    plain = _group_model(tmp_path, 0, 0)._supervised(logits, logits, labels, probability)
    # The main head and the auxiliary one (weight 0.4) see the same logits here. Our label probabilities come from a
    # log-sum-exp, the release's from a softmax: a few near-equal pixels at the 100000-th can swap, each moving a mean
    # of >= 100000 pixels by at most its cross-entropy / 100000 (< 1e-4 of the mean here).
    assert float(grouped) == pytest.approx(1.4 * float(sum(per_gpu)) / 2, rel=1e-4)
    assert float(plain) == pytest.approx(1.4 * float(whole), rel=1e-4)
    assert abs(float(grouped) - float(plain)) > 0.05 * float(plain)  # the grouping matters here


def test_the_consistency_and_the_entropy_percentile_per_gpu_as_released(tmp_path):
    # Criterion_cons normalises its weights over each GPU's batch (loss_helper.py:376): 4 labelled crops and the one
    # mixed unlabelled image; train.py:552-561 takes the entropy percentile of that one image (np.percentile) and, as
    # released, ignores the pixels below it.
    from test_semi_supervised import _reference_consistency

    model = _group_model(tmp_path, 4, 1)
    model.equalisation_sampling = False  # the random field differs by design (B12); the normalisation is the point
    g = torch.Generator().manual_seed(1)
    # Two confident images the student agrees with (heavy weights, low cross-entropy), two unconfident ones it does
    # not: one normalisation over the batch weighs the first two, one per image counts each alike.
    scale = torch.tensor([3.0, 3.0, 0.3, 0.3]).view(4, 1, 1, 1)
    teacher_logits = torch.randn(4, 19, 769, 769, generator=g) * scale
    logits = torch.cat([teacher_logits[:2], 3 * torch.randn(2, 19, 769, 769, generator=g)])
    teacher = torch.softmax(teacher_logits, 1)
    confidence, pseudo = teacher.max(1)
    ours = model._consistency(logits, confidence, pseudo, labelled=False)
    theirs = sum(_reference_consistency(logits[k : k + 1], confidence[k : k + 1], pseudo[k : k + 1]) for k in range(4))
    # float32 sums of 591361 terms in another order: relative differences of ~1e-6.
    assert float(ours) == pytest.approx(float(theirs) / 4, rel=1e-5)
    whole = _reference_consistency(logits, confidence, pseudo)
    labelled = model._consistency(logits, confidence, pseudo, labelled=True)  # one group of 4: one normalisation
    assert float(labelled) == pytest.approx(float(whole), rel=1e-5)
    assert float(ours) > 2 * float(whole)
    entropy = -(teacher * torch.log(teacher + 1e-10)).sum(1)
    model.as_released = True
    filtered = model._filter_unlabelled(pseudo.clone(), entropy, 15.0)
    for k in range(4):
        expected = pseudo[k].clone()
        expected[entropy[k] < float(np.percentile(entropy[k].numpy().flatten(), 15.0))] = 255
        assert torch.equal(filtered[k], expected)


# ------------------------------------------------------------------------------------- B11: the release's validation
def test_center_crop_evaluates_the_releases_769_centre_of_each_val_image(tmp_path):
    # ILM-ASSL validates on Cityscapes val through Crop((769, 769), "center") (config.yaml's val crop,
    # augmentation.py:255-263: offsets (h - 769) // 2, (w - 769) // 2), at the images' own 2048x1024.
    from uda_plugins.data.mapper import UDADatasetMapper

    h, w = 1024, 2048
    image, label = _image(h, w), _blocky_label(h, w)
    Image.fromarray(image).save(tmp_path / "x_leftImg8bit.png")
    Image.fromarray(label).save(tmp_path / "x_gtFine_labelTrainIds.png")
    d = dict(
        file_name=str(tmp_path / "x_leftImg8bit.png"), sem_seg_file_name=str(tmp_path / "x_gtFine_labelTrainIds.png")
    )
    cfg = _paper_cfg(**{"TEST.CENTER_CROP": "(769, 769)"})
    out = UDADatasetMapper.from_config(cfg, "test", load_label=True)(d)
    y = torch.from_numpy(label)[None, None]
    h_off, w_off = (h - 769) // 2, (w - 769) // 2  # the release's Crop, center type
    assert (out["height"], out["width"]) == (769, 769)
    assert torch.equal(out["sem_seg"], y[0, 0, h_off : h_off + 769, w_off : w_off + 769].long())
    assert torch.equal(
        out["image"], torch.from_numpy(image).permute(2, 0, 1)[:, h_off : h_off + 769, w_off : w_off + 769]
    )
    whole = UDADatasetMapper.from_config(_paper_cfg(), "test", load_label=True)(d)
    assert whole["sem_seg"].shape == (h, w)  # by default the whole image


def test_the_releases_validation_selects_the_best_teacher_on_centre_crops(tmp_path):
    # train.py:257-277: every epoch both networks are validated (on centre crops) and ckpt_best is the checkpoint
    # with the best *teacher* mIoU; eval.py:137-177 then evaluates both networks of it.
    import json
    import sys

    from uda_plugins.engine.trainer import UDATrainer

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train_net

    out = str(tmp_path / "run")
    extra = {
        "DATASETS.TARGET_LABELED_LIST": "random:3",
        "UDA.STAL.OHEM_MIN_KEPT": 200,
        "SOLVER.MAX_ITER": 6,
        "TEST.EVAL_PERIOD": 2,
        "TEST.EVAL_MODEL": "both",
        "TEST.SAVE_BEST_ON_TEST": True,
        "TEST.BEST_ON_TEST_MODEL": "teacher",
        "TEST.CENTER_CROP": "(32, 64)",
    }
    assert train_net.cli(["--config-file", STAL_SYNTHETIC] + tiny_overrides(out, **extra)) == 0
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    teacher = {r["iteration"]: r["teacher/sem_seg/mIoU"] for r in records if "teacher/sem_seg/mIoU" in r}
    both = [r for r in records if "teacher/sem_seg/mIoU" in r]
    assert len(teacher) == 3 and all("student/sem_seg/mIoU" in r for r in both)  # both reported, every period
    best = torch.load(os.path.join(out, "model_best_on_test.pth"), weights_only=True)["iteration"]
    assert teacher[best] == max(teacher.values()) and best == min(i for i in teacher if teacher[i] == teacher[best])
    cfg = get_uda_cfg()
    cfg.merge_from_file(STAL_SYNTHETIC)
    cfg.merge_from_list(["TEST.EVAL_MODEL", "both"])
    assert UDATrainer.best_metric_name(cfg) == "student/sem_seg/mIoU"  # the first evaluated, by default
    cfg.merge_from_list(["TEST.BEST_ON_TEST_MODEL", "teacher"])
    assert UDATrainer.best_metric_name(cfg) == "teacher/sem_seg/mIoU"
    cfg.merge_from_list(["TEST.EVAL_MODEL", "student"])
    with pytest.raises(ValueError, match="TEST.BEST_ON_TEST_MODEL 'teacher' is not evaluated"):
        UDATrainer.best_metric_name(cfg)


# ------------------------------------------------------------------------------------- B5: the selection score
def test_the_selection_score_can_see_the_releases_squashed_769_input(tmp_path):
    # core/active_learning/Semi-sup_active_pu.py:47-70: the whole 2048x1024 image normalised, squashed to 769x769
    # (bilinear, align_corners=True), the network's logits at its output stride resized to 1024x2048 alike; then the
    # mean normalised entropy (:105-125; the library's image_entropy, equal to it: the audit's c4).
    from uda_plugins.active_learning.selection import image_entropy
    from uda_plugins.modeling.inference import predict_full_views

    model = _group_model(tmp_path, 0, 0).eval()
    network = model.teacher
    image = torch.from_numpy(_image(1024, 2048)).permute(2, 0, 1).contiguous()
    loader = [[{"image": image, "dataset_index": 7}]]
    (indices, ours), *_ = predict_full_views(network, loader, network.normalize, (769, 769))
    x = (image[None].float() - torch.tensor(MEAN).float().view(1, 3, 1, 1)) / torch.tensor(STD).float().view(1, 3, 1, 1)
    with torch.no_grad():
        x = F.interpolate(x, (769, 769), mode="bilinear", align_corners=True)
        pred = network(x)  # the head's logits at its stride, the release's outs["pred"]
        theirs = torch.softmax(F.interpolate(pred, (1024, 2048), mode="bilinear", align_corners=True), 1)
    assert indices == [7] and pred.shape[-1] < 769 and ours.shape == theirs.shape
    # The same float32 operations; only the normalisation's form (the network's mean/std as tensors) can differ in
    # the last bits.
    assert torch.allclose(ours, theirs, atol=1e-5)
    (_, whole), *_ = predict_full_views(network, loader, network.normalize)  # the default: the whole 1024x2048 image
    # Another input, other probabilities (an untrained, nearly uniform network: differences of ~1e-3, far outside the
    # tolerance above).
    assert (whole - ours).abs().max() > 30 * 1e-5
    assert float(image_entropy(ours)) == pytest.approx(float(_release_image_entropy(theirs)), rel=1e-6)


def _release_image_entropy(p: torch.Tensor) -> float:
    """prediction_uncertainty (Semi-sup_active_pu.py:105-125) on softmax probabilities (1, 19, h, w)."""
    import math

    pixel_entropy = torch.sum(-p[0] * torch.log(p[0] + 1e-6), dim=0) / math.log(19)
    return float(np.mean(pixel_entropy.numpy()))
