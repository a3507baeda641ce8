"""The real-dataset modules (Cityscapes, GTA5, SYNTHIA, IDD, Mapillary) on tiny fake trees in their on-disk layouts:
label preparation checked pixel by pixel against hand-written expectations, the loaders' dicts, registration,
the prepare CLIs, and the one-line errors for missing folders, missing labels and unknown label values."""

import json
import logging
import os
import runpy
import uuid

import cv2
import numpy as np
import pytest
from PIL import Image

from uda_plugins.d2 import DatasetCatalog, MetadataCatalog
from uda_plugins.data.datasets import cityscapes, gta5, idd, mapillary, synthia
from uda_plugins.data.labels import CITYSCAPES_19, MTAF_7, UnknownLabelError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 8, 16
IGN = 255  # ignore
# MTAF 7 classes
FLAT, CONSTRUCTION, OBJECT, NATURE, SKY, HUMAN, VEHICLE = range(7)


# ----------------------------------------------------------------------------------------------------------------
# writers for the raw formats


def _image(path, seed=0):
    """A random HxW RGB image, PNG or JPEG after the file's extension."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)


def _grey_png(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(ids, dtype=np.uint8)).save(path)


def _palette_png(path, ids):
    """A real palette PNG whose indices are ``ids`` and whose colours are not grey levels, as GTA5's and
    Mapillary's labels are: reading it through convert("L") would give other values."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ids = np.asarray(ids, dtype=np.uint8)
    img = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())
    img.putpalette([(37 * i + 11) % 256 for i in range(3 * 256)])
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "P" and not np.array_equal(np.asarray(check.convert("L")), ids)


def _synthia_png(path, class_ids):
    """SYNTHIA's raw label: 16-bit 3-channel PNG, class id in the first (R) channel, other data in G and B."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    red = np.asarray(class_ids, dtype=np.uint16)
    green = (1000 + np.arange(red.size, dtype=np.uint16)).reshape(red.shape)  # instance-like values above 255
    blue = np.full_like(red, 7)
    assert cv2.imwrite(path, np.stack([blue, green, red], axis=-1))  # OpenCV writes BGR arrays as RGB PNGs


def _ids(values):
    """An HxW label holding ``values`` in turn, so that every value covers several pixels."""
    flat = np.resize(np.asarray(values), H * W)
    return flat.reshape(H, W)


def _read(path):
    return np.asarray(Image.open(path))


def _assert_mapped(prepared_file, raw, expected, column=None):
    """The prepared file equals the hand-written ``expected`` table (raw value -> class, or -> a tuple of classes
    indexed by ``column``) applied to ``raw`` pixel by pixel."""
    table = {k: v if column is None else v[column] for k, v in expected.items()}
    np.testing.assert_array_equal(_read(prepared_file), np.vectorize(lambda v: table[int(v)])(raw).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------------------
# GTA5

# raw id -> (19-class trainId, 7-class)
GTA5_EXPECTED = {
    0: (IGN, IGN),  # unlabeled
    7: (0, FLAT),  # road
    8: (1, FLAT),  # sidewalk
    11: (2, CONSTRUCTION),
    21: (8, NATURE),  # vegetation
    22: (9, FLAT),  # terrain -> flat for GTA5 (nature for Cityscapes)
    23: (10, SKY),
    26: (13, VEHICLE),  # car
    29: (IGN, IGN),  # caravan: not mapped in GTA5's 7-class table
    30: (IGN, IGN),  # trailer: idem
    33: (18, VEHICLE),  # bicycle
    34: (IGN, IGN),  # MCL's extra void id
}


def _gta5_tree(root, n=3):
    raws = []
    for i in range(n):
        name = f"{i + 1:05d}.png"
        _image(os.path.join(root, "images", name), seed=i)
        raw = np.roll(_ids(list(GTA5_EXPECTED)), i)
        _palette_png(os.path.join(root, "labels", name), raw)
        raws.append(raw)
    return raws


def test_gta5_prepare_maps_palette_indices_pixel_by_pixel(tmp_path):
    root = str(tmp_path / "gta5")
    raws = _gta5_tree(root)
    assert gta5.prepare_gta5(root) == 6
    assert gta5.prepare_gta5(root) == 0  # existing files are kept
    for i, raw in enumerate(raws):
        stem = os.path.join(root, "labels", f"{i + 1:05d}")
        _assert_mapped(stem + "_labelTrainIds.png", raw, GTA5_EXPECTED, 0)
        _assert_mapped(stem + "_label7Ids.png", raw, GTA5_EXPECTED, 1)

    dicts = gta5.load_gta5_semseg(root)
    assert [d["image_id"] for d in dicts] == ["00001", "00002", "00003"]
    assert dicts[0] == {
        "file_name": os.path.join(root, "images", "00001.png"),
        "sem_seg_file_name": os.path.join(root, "labels", "00001_labelTrainIds.png"),
        "height": H,
        "width": W,
        "image_id": "00001",
        "raw_sem_seg_file_name": os.path.join(root, "labels", "00001.png"),  # as downloaded (STAL's paste as released)
    }
    dicts_7 = gta5.load_gta5_semseg(root, gta5.LABEL_SUFFIXES["mtaf7"])
    assert dicts_7[2]["sem_seg_file_name"] == os.path.join(root, "labels", "00003_label7Ids.png")


def test_gta5_label_of_another_size_is_resized_to_its_image(tmp_path, caplog):
    root = str(tmp_path / "gta5")
    _image(os.path.join(root, "images", "00001.png"))
    raw = np.full((H // 2, W // 2), 7, dtype=np.uint8)
    raw[:, W // 4 :] = 26
    _palette_png(os.path.join(root, "labels", "00001.png"), raw)
    with caplog.at_level(logging.WARNING):
        gta5.prepare_gta5(root)
    assert "00001.png" in caplog.text and "resizing" in caplog.text
    out = _read(os.path.join(root, "labels", "00001_labelTrainIds.png"))
    assert out.shape == (H, W)
    assert (out[:, : W // 2] == 0).all() and (out[:, W // 2 :] == 13).all()


def test_gta5_unknown_label_value_names_the_file(tmp_path):
    root = str(tmp_path / "gta5")
    _gta5_tree(root, n=1)
    bad = os.path.join(root, "labels", "00001.png")
    _palette_png(bad, _ids([7, 35]))
    with pytest.raises(UnknownLabelError, match=r"00001\.png.*\[35\]"):
        gta5.prepare_gta5(root)


# ----------------------------------------------------------------------------------------------------------------
# Cityscapes (the 7-class quirk's other side)

CITYSCAPES_EXPECTED = {
    0: (IGN, IGN),
    7: (0, FLAT),
    21: (8, NATURE),
    22: (9, NATURE),
    29: (IGN, VEHICLE),
    26: (13, VEHICLE),
}


def test_cityscapes_terrain_is_nature_and_caravan_vehicle_in_7_classes(tmp_path):
    root = str(tmp_path / "cityscapes")
    raw = _ids(list(CITYSCAPES_EXPECTED))
    for split in ("train", "val"):
        _image(os.path.join(root, "leftImg8bit", split, "aachen", "aachen_000000_000019_leftImg8bit.png"))
        _grey_png(os.path.join(root, "gtFine", split, "aachen", "aachen_000000_000019_gtFine_labelIds.png"), raw)
    assert cityscapes.prepare_cityscapes(root) == 4
    stem = os.path.join(root, "gtFine", "val", "aachen", "aachen_000000_000019")
    _assert_mapped(stem + "_gtFine_labelTrainIds.png", raw, CITYSCAPES_EXPECTED, 0)
    _assert_mapped(stem + "_gtFine_label7Ids.png", raw, CITYSCAPES_EXPECTED, 1)


# ----------------------------------------------------------------------------------------------------------------
# SYNTHIA

SYNTHIA_EXPECTED = {
    0: IGN,  # void
    1: 10,  # sky
    2: 2,  # building
    3: 0,  # road
    8: 13,  # car
    13: IGN,  # parking-slot
    16: 9,  # terrain (DAFormer maps it though SYNTHIA has none)
    21: 3,  # wall
    22: IGN,  # lane-marking
}


def _synthia_tree(root, n=2):
    raws = []
    for i in range(n):
        name = f"{i:07d}.png"
        _image(os.path.join(root, "RGB", name), seed=i)
        raw = np.roll(_ids(list(SYNTHIA_EXPECTED)), i)
        _synthia_png(os.path.join(root, "GT", "LABELS", name), raw)
        raws.append(raw)
    return raws


def test_synthia_reads_the_class_channel_of_16_bit_labels(tmp_path):
    root = str(tmp_path / "synthia")
    raws = _synthia_tree(root)
    with Image.open(os.path.join(root, "GT", "LABELS", "0000000.png")) as pil:
        assert not np.array_equal(np.asarray(pil)[..., 0], raws[0])  # why the raw labels are read with OpenCV
    assert synthia.prepare_synthia(root) == 2
    for i, raw in enumerate(raws):
        _assert_mapped(os.path.join(root, "GT", "LABELS", f"{i:07d}_labelTrainIds.png"), raw, SYNTHIA_EXPECTED)
    dicts = synthia.load_synthia_semseg(root)
    assert dicts[1] == {
        "file_name": os.path.join(root, "RGB", "0000001.png"),
        "sem_seg_file_name": os.path.join(root, "GT", "LABELS", "0000001_labelTrainIds.png"),
        "height": H,
        "width": W,
        "image_id": "0000001",
        "raw_sem_seg_file_name": os.path.join(root, "GT", "LABELS", "0000001.png"),
    }


def test_synthia_with_ilm_assl_ids_reproduces_the_released_mapping(tmp_path):
    from uda_plugins.config import get_uda_cfg
    from uda_plugins.data.mapper import UDADatasetMapper

    root = str(tmp_path / "synthia")
    _synthia_tree(root, n=1)
    synthia.prepare_synthia(root)
    prefix = f"test_synthia_{uuid.uuid4().hex[:8]}"
    synthia.register_synthia(root, name_prefix=prefix)
    try:
        (plain,) = DatasetCatalog.get(f"{prefix}_train")
        (variant,) = DatasetCatalog.get(f"{prefix}_ilm_assl_ids_train")
    finally:
        for name in (f"{prefix}_train", f"{prefix}_ilm_assl_ids_train"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    mapper = UDADatasetMapper(is_train=False, input_cfg=get_uda_cfg().INPUT.TEST, num_classes=19, load_label=True)
    a, b = mapper(plain)["sem_seg"].numpy(), mapper(variant)["sem_seg"].numpy()
    names = CITYSCAPES_19.classes
    # ILM-ASSL's id_to_trainid_synthia: road..vegetation keep their ids; sky 10 -> 9, person 11 -> 10, ...,
    # bicycle 18 -> 15; ignored pixels stay ignored.
    expected = {0: 0, 8: 8, names.index("sky"): 9, names.index("person"): 10, names.index("bicycle"): 15, 255: 255}
    for old, new in expected.items():
        assert (b[a == old] == new).all(), old
    assert (a == names.index("sky")).any() and (b[a == names.index("sky")] == 9).all()


@pytest.mark.parametrize("value, message", [(23, r"not in the class table"), (300, r"outside the class table")])
def test_synthia_unknown_label_value_names_the_file(tmp_path, value, message):
    root = str(tmp_path / "synthia")
    _synthia_tree(root, n=1)
    _synthia_png(os.path.join(root, "GT", "LABELS", "0000000.png"), _ids([3, value]))
    with pytest.raises(UnknownLabelError, match=rf"0000000\.png.*{message}"):
        synthia.prepare_synthia(root)


def test_synthia_label_in_another_format_fails_naming_the_file(tmp_path):
    root = str(tmp_path / "synthia")
    _synthia_tree(root, n=1)
    _grey_png(os.path.join(root, "GT", "LABELS", "0000000.png"), _ids([3]))
    with pytest.raises(ValueError, match=r"0000000\.png.*16-bit 3-channel"):
        synthia.prepare_synthia(root)


# ----------------------------------------------------------------------------------------------------------------
# IDD (id level 0..39)

IDD_EXPECTED = {
    0: (0, FLAT),  # road
    1: (IGN, IGN),  # parking
    2: (IGN, FLAT),  # drivable fallback
    3: (1, FLAT),  # sidewalk
    5: (9, IGN),  # non-drivable fallback -> terrain
    11: (IGN, VEHICLE),  # autorickshaw
    12: (13, VEHICLE),  # car
    19: (IGN, CONSTRUCTION),  # curb
    23: (IGN, OBJECT),  # billboard
    25: (6, OBJECT),  # traffic light
    29: (2, CONSTRUCTION),  # building
    32: (8, NATURE),  # vegetation
    33: (10, SKY),
    35: (IGN, IGN),  # unlabeled, the toolkit's background
    39: (IGN, IGN),  # license plate
}


def _idd_tree(root, splits=("train", "val")):
    raws = {}
    for s, split in enumerate(splits):
        for i, (seq, frame) in enumerate((("0", "000123"), ("31", "004567"))):
            _image(os.path.join(root, "leftImg8bit", split, seq, f"{frame}_leftImg8bit.png"), seed=i)
            raw = np.roll(_ids(list(IDD_EXPECTED)), i + s)
            _grey_png(os.path.join(root, "gtFine", split, seq, f"{frame}_gtFine_labelids.png"), raw)
            raws[split, seq, frame] = raw
    return raws


def test_idd_prepare_maps_id_level_labels_pixel_by_pixel(tmp_path):
    root = str(tmp_path / "idd")
    raws = _idd_tree(root)
    assert idd.prepare_idd(root) == 8
    for (split, seq, frame), raw in raws.items():
        stem = os.path.join(root, "gtFine", split, seq, frame)
        _assert_mapped(stem + "_gtFine_labelTrainIds.png", raw, IDD_EXPECTED, 0)
        _assert_mapped(stem + "_gtFine_label7Ids.png", raw, IDD_EXPECTED, 1)
    dicts = idd.load_idd_semseg(root, "val", idd.LABEL_SUFFIXES["mtaf7"])
    assert [d["image_id"] for d in dicts] == ["0/000123", "31/004567"]
    assert dicts[1] == {
        "file_name": os.path.join(root, "leftImg8bit", "val", "31", "004567_leftImg8bit.png"),
        "sem_seg_file_name": os.path.join(root, "gtFine", "val", "31", "004567_gtFine_label7Ids.png"),
        "height": H,
        "width": W,
        "image_id": "31/004567",
    }


def test_idd_errors_name_the_folder_the_files_and_the_toolkit_command(tmp_path):
    root = str(tmp_path / "idd")
    _idd_tree(root, splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val' does not exist.*datasets/README\.md"):
        idd.load_idd_semseg(root, "val")
    os.remove(os.path.join(root, "gtFine", "train", "31", "004567_gtFine_labelids.png"))
    message = r"004567_leftImg8bit\.png' has no label file '.*004567_gtFine_labelids\.png'.*--id-type id"
    with pytest.raises(FileNotFoundError, match=message):
        idd.prepare_idd(root, splits=("train",))
    _grey_png(os.path.join(root, "gtFine", "train", "31", "004567_gtFine_labelids.png"), _ids([0, 40]))
    with pytest.raises(UnknownLabelError, match=r"004567_gtFine_labelids\.png.*\[40\]"):
        idd.prepare_idd(root, splits=("train",))


# ----------------------------------------------------------------------------------------------------------------
# Mapillary Vistas: name-based mapping through config.json

# A config in an order of its own: the mapping must follow the names, not the index positions of the real config.
MAPILLARY_CLASSES = [
    "Terrain",
    "Road",
    "Car",
    "Vegetation",
    "Bird",
    "Traffic Sign (Back)",
    "Curb",
    "Bicyclist",
    "Unlabeled",
]
MAPILLARY_EXPECTED = {
    0: (9, FLAT),  # terrain -> flat in the 7-class protocol
    1: (0, FLAT),
    2: (13, VEHICLE),
    3: (8, NATURE),
    4: (IGN, IGN),  # bird
    5: (7, OBJECT),  # traffic sign (back) -> traffic sign
    6: (IGN, CONSTRUCTION),  # curb
    7: (12, HUMAN),  # bicyclist -> rider
    8: (IGN, IGN),
}


def _mapillary_tree(root, classes=MAPILLARY_CLASSES, labels_dir="labels", config="config.json"):
    with open(os.path.join(_mkdir(root), config), "w") as f:
        json.dump({"labels": [{"name": n.lower().replace(" ", "-"), "readable": n} for n in classes]}, f)
    raws = {}
    for s, split in enumerate(("training", "validation")):
        for i, stem in enumerate(("-0ZTy7xMJDkzK0vHI6Mfsw", "_1Gn_xkw7sa_i9GU4mkxxQ")):
            _image(os.path.join(root, split, "images", stem + ".jpg"), seed=i)
            raw = np.roll(_ids(list(MAPILLARY_EXPECTED)), i + s)
            _palette_png(os.path.join(root, split, labels_dir, stem + ".png"), raw)
            raws[split, stem] = raw
    return raws


def _mkdir(path):
    os.makedirs(path, exist_ok=True)
    return path


@pytest.mark.parametrize("layout", ["v1.2", "v2.0 download"])
def test_mapillary_prepare_maps_by_class_name_pixel_by_pixel(tmp_path, layout):
    root = str(tmp_path / "mapillary")
    if layout == "v1.2":
        labels_dir, config = "labels", "config.json"
    else:  # the v2.0 download's copy of the v1.2 labels
        labels_dir, config = os.path.join("v1.2", "labels"), "config_v1.2.json"
    raws = _mapillary_tree(root, labels_dir=labels_dir, config=config)
    assert mapillary.prepare_mapillary(root) == 8
    for (split, stem), raw in raws.items():
        base = os.path.join(root, split, labels_dir, stem)
        _assert_mapped(base + "_labelTrainIds.png", raw, MAPILLARY_EXPECTED, 0)
        _assert_mapped(base + "_label7Ids.png", raw, MAPILLARY_EXPECTED, 1)
    dicts = mapillary.load_mapillary_semseg(root, "train")
    assert dicts[0] == {
        "file_name": os.path.join(root, "training", "images", "-0ZTy7xMJDkzK0vHI6Mfsw.jpg"),
        "sem_seg_file_name": os.path.join(root, "training", labels_dir, "-0ZTy7xMJDkzK0vHI6Mfsw_labelTrainIds.png"),
        "height": H,
        "width": W,
        "image_id": "-0ZTy7xMJDkzK0vHI6Mfsw",
    }


def test_mapillary_errors(tmp_path):
    root = str(tmp_path / "mapillary")
    _mapillary_tree(root)
    # a label index beyond the config's classes
    bad = os.path.join(root, "validation", "labels", "_1Gn_xkw7sa_i9GU4mkxxQ.png")
    _palette_png(bad, _ids([1, len(MAPILLARY_CLASSES)]))
    with pytest.raises(UnknownLabelError, match=r"_1Gn_xkw7sa_i9GU4mkxxQ\.png.*\[9\]"):
        mapillary.prepare_mapillary(root)
    # a class the tables do not know (a v2.0 config, say)
    _mapillary_tree(root, classes=MAPILLARY_CLASSES[:-1] + ["Traffic Island"])
    with pytest.raises(ValueError, match=r"config\.json: class 'Traffic Island' \(label index 8\)"):
        mapillary.prepare_mapillary(root)
    os.remove(os.path.join(root, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"config\.json' does not exist"):
        mapillary.load_mapillary_semseg(root, "val")


# ----------------------------------------------------------------------------------------------------------------
# shared behaviour: missing folders and labels, registration, the CLIs


@pytest.mark.parametrize(
    "load, folder",
    [
        (lambda r: gta5.load_gta5_semseg(r), ""),
        (lambda r: synthia.load_synthia_semseg(r), ""),
        (lambda r: idd.load_idd_semseg(r, "train"), ""),
        (lambda r: mapillary.load_mapillary_semseg(r, "train"), ""),
        (lambda r: gta5.load_gta5_semseg(_mkdir(r)), "images"),
        (lambda r: synthia.load_synthia_semseg(_mkdir(r)), "RGB"),
        (lambda r: idd.load_idd_semseg(_mkdir(r), "train"), "leftImg8bit/train"),
    ],
)
def test_missing_folder_fails_naming_it(tmp_path, load, folder):
    root = str(tmp_path / "nowhere")
    expected = os.path.join(root, folder) if folder else root
    with pytest.raises(FileNotFoundError, match=rf"folder '{expected}' does not exist"):
        load(root)


@pytest.mark.parametrize("dataset", ["gta5", "synthia", "mapillary"])
def test_image_without_prepared_label_names_both_and_the_command(tmp_path, dataset):
    root = str(tmp_path / dataset)
    if dataset == "gta5":
        _gta5_tree(root, n=1)
        load, image, label = gta5.load_gta5_semseg, "00001.png", "00001_labelTrainIds.png"
    elif dataset == "synthia":
        _synthia_tree(root, n=1)
        load, image, label = synthia.load_synthia_semseg, "0000000.png", "0000000_labelTrainIds.png"
    else:
        _mapillary_tree(root)
        load = lambda r: mapillary.load_mapillary_semseg(r, "val")  # noqa: E731
        image, label = "-0ZTy7xMJDkzK0vHI6Mfsw.jpg", "-0ZTy7xMJDkzK0vHI6Mfsw_labelTrainIds.png"
    message = rf"{image}' has no label file '.*{label}'.*tools/prepare_{dataset}\.py"
    with pytest.raises(FileNotFoundError, match=message):
        load(root)


def test_standard_names_are_registered_lazily():
    for name in (
        "gta5_train",
        "gta5_7cls_train",
        "synthia_train",
        "idd_train",
        "idd_7cls_val",
        "mapillary_val",
        "mapillary_7cls_train",
    ):
        assert name in DatasetCatalog.list()
    assert MetadataCatalog.get("gta5_7cls_train").stuff_classes == list(MTAF_7.classes)
    assert MetadataCatalog.get("idd_val").stuff_classes == list(CITYSCAPES_19.classes)


def test_register_under_own_names_and_load_through_the_catalog(tmp_path):
    roots = {name: str(tmp_path / name) for name in ("gta5", "synthia", "idd", "mapillary")}
    _gta5_tree(roots["gta5"], n=2)
    _synthia_tree(roots["synthia"], n=2)
    _idd_tree(roots["idd"])
    _mapillary_tree(roots["mapillary"])
    gta5.prepare_gta5(roots["gta5"])
    synthia.prepare_synthia(roots["synthia"])
    idd.prepare_idd(roots["idd"])
    mapillary.prepare_mapillary(roots["mapillary"])

    prefix = f"test_{uuid.uuid4().hex[:8]}"
    gta5.register_gta5(roots["gta5"], name_prefix=prefix + "_gta5")
    synthia.register_synthia(roots["synthia"], name_prefix=prefix + "_synthia")
    idd.register_idd(roots["idd"], name_prefix=prefix + "_idd")
    mapillary.register_mapillary(roots["mapillary"], name_prefix=prefix + "_mapillary")
    names = [n for n in DatasetCatalog.list() if n.startswith(prefix)]
    try:
        assert len(names) == 2 + 2 + 4 + 4  # GTA5 (19, 7 classes), SYNTHIA (19, ILM-ASSL ids), IDD, Mapillary
        for name in names:
            dicts = DatasetCatalog.get(name)
            meta = MetadataCatalog.get(name)
            class_set = MTAF_7 if "_7cls_" in name else CITYSCAPES_19
            assert len(dicts) == 2 and meta.stuff_classes == list(class_set.classes) and meta.ignore_label == 255
            for d in dicts:
                label = _read(d["sem_seg_file_name"])
                assert label.shape == (d["height"], d["width"])
                assert set(np.unique(label)) <= set(range(class_set.num_classes)) | {255}
            assert meta.dataset_root in roots.values()
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _tool(name):
    return runpy.run_path(os.path.join(REPO, "tools", f"prepare_{name}.py"), run_name="prepare_tool")["main"]


def test_prepare_tools_write_keep_and_overwrite(tmp_path, capsys):
    root = str(tmp_path / "gta5")
    _gta5_tree(root, n=2)
    main = _tool("gta5")
    assert main(["--root", root]) == 0
    assert "Wrote 4 label files" in capsys.readouterr().out
    assert main(["--root", root]) == 0
    assert "Wrote 0 label files" in capsys.readouterr().out
    assert main(["--root", root, "--overwrite"]) == 0
    assert "Wrote 4 label files" in capsys.readouterr().out

    idd_root = str(tmp_path / "idd")
    _idd_tree(idd_root, splits=("val",))
    assert _tool("idd")(["--root", idd_root, "--splits", "val"]) == 0
    assert "Wrote 4 label files" in capsys.readouterr().out
    assert _tool("idd")(["--root", idd_root]) == 1  # no train split
    err = capsys.readouterr().err
    assert err.startswith("prepare_idd.py: error: ") and "gtFine/train" in err and err.count("\n") == 1

    for name in ("cityscapes", "synthia", "mapillary"):
        assert _tool(name)(["--root", str(tmp_path / "absent")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"prepare_{name}.py: error: ") and "absent" in err and "does not exist" in err
