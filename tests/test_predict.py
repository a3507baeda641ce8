"""tools/predict.py on images (files, a folder, a glob) and a video, with a trained checkpoint, whole-image and
sliding-window inference."""

import glob
import os
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, tiny_overrides

sys.path.insert(0, os.path.join(REPO, "tools"))
import predict  # noqa: E402
import train_net  # noqa: E402

SOURCE_ONLY = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")
TINY = ["MODEL.DEVICE", "cpu", "DATASETS.TEST", "('synthetic_tiny_target_val',)"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trained"))
    overrides = tiny_overrides(out, **{"SOLVER.MAX_ITER": 2, "TEST.EVAL_PERIOD": 0, "VIS_PERIOD": 0})
    assert train_net.cli(["--config-file", SOURCE_ONLY] + overrides) == 0
    return os.path.join(out, "model_final.pth")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from uda_plugins.d2 import DatasetCatalog

    folder = tmp_path_factory.mktemp("images")
    for d in DatasetCatalog.get("synthetic_tiny_target_val")[:3]:
        cv2.imwrite(str(folder / os.path.basename(d["file_name"]).replace(".png", ".jpg")), cv2.imread(d["file_name"]))
    return folder


def _predict(args):
    return predict.main(["--config-file", SOURCE_ONLY] + args)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_images_from_a_folder_and_a_glob(checkpoint, images, tmp_path, mode):
    from uda_plugins.utils.visualization import palette_for_dataset

    out = tmp_path / "out"
    extra = ["TEST.MODE", mode, "TEST.SLIDE_CROP_SIZE", "(32, 48)", "TEST.SLIDE_STRIDE", "(16, 24)"]
    args = ["--input", str(images), "--output", str(out), "--batch-size", "2", "MODEL.WEIGHTS", checkpoint]
    assert _predict(args + TINY + extra) == 0
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(images))
    palette = palette_for_dataset("synthetic_tiny_target_val", 19)
    for stem in stems:
        labels = cv2.imread(str(out / f"{stem}_labels.png"), cv2.IMREAD_UNCHANGED)
        seg = cv2.imread(str(out / f"{stem}_seg.png"))[:, :, ::-1]
        overlay = cv2.imread(str(out / f"{stem}_overlay.png"))
        image = cv2.imread(str(images / f"{stem}.jpg"))
        assert labels.shape == image.shape[:2] == seg.shape[:2] == overlay.shape[:2]
        assert labels.max() < 19
        np.testing.assert_array_equal(seg, palette[labels])  # the dataset's palette
    glob_out = tmp_path / "glob"
    assert (
        _predict(["--input", str(images / "*.jpg"), "--output", str(glob_out), "MODEL.WEIGHTS", checkpoint] + TINY) == 0
    )
    assert len(glob.glob(str(glob_out / "*_labels.png"))) == len(stems)


def test_predictions_are_the_evaluated_models(checkpoint, images):
    # The labels written equal the argmax of the model's own inference on the same input.
    from uda_plugins.config import get_uda_cfg

    cfg = get_uda_cfg()
    cfg.merge_from_file(SOURCE_ONLY)
    cfg.merge_from_list(TINY + ["MODEL.WEIGHTS", checkpoint])
    predictor = predict.Predictor(cfg)
    frame = predict.read_rgb(str(sorted(images.iterdir())[0]))
    (labels,) = predictor([frame])
    x = {"image": torch.from_numpy(frame.transpose(2, 0, 1).copy()), "height": 48, "width": 96}
    with torch.no_grad():
        expected = predictor.model([x])[0]["sem_seg"].argmax(0).numpy()
    np.testing.assert_array_equal(labels, expected)


def test_video_in_annotated_video_out(checkpoint, images, tmp_path):
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (96, 48))
    frames = [cv2.imread(str(p)) for p in sorted(images.iterdir())]
    for frame in frames * 2:
        writer.write(frame)
    writer.release()
    out = tmp_path / "out"
    assert _predict(["--input", video, "--output", str(out), "MODEL.WEIGHTS", checkpoint] + TINY) == 0
    capture = cv2.VideoCapture(str(out / "clip_overlay.mp4"))
    count = 0
    while capture.read()[0]:
        count += 1
    assert count == 2 * len(frames)
    assert capture.get(cv2.CAP_PROP_FRAME_WIDTH) == 96 and capture.get(cv2.CAP_PROP_FRAME_HEIGHT) == 48
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temp file left


def test_bad_inputs_get_one_line(tmp_path, capsys, images):
    assert _predict(["--input", str(tmp_path / "nothing.png"), "--output", str(tmp_path / "o")] + TINY) == 1
    assert "is not a file, a folder or a glob" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert _predict(["--input", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "o")] + TINY) == 1
    assert "neither an image" in capsys.readouterr().err
    args = ["--input", str(images), "--output", str(tmp_path / "o"), "MODEL.WEIGHTS", str(tmp_path / "x.pth")]
    assert _predict(args + TINY) == 1
    assert "MODEL.WEIGHTS file" in capsys.readouterr().err


def test_a_cityscapes_layout_folder_is_searched_through_its_sub_folders_and_mirrored(
    checkpoint, images, tmp_path, capsys
):
    import shutil

    root = tmp_path / "leftImg8bit" / "val"
    names = sorted(p.name for p in images.iterdir())[:2]
    for city in ("aachen", "bochum"):  # the same file names in both cities
        (root / city).mkdir(parents=True)
        for name in names:
            shutil.copy(images / name, root / city / name)
    out = tmp_path / "out"
    assert _predict(["--input", str(root), "--output", str(out), "MODEL.WEIGHTS", checkpoint] + TINY) == 0
    written = sorted(os.path.relpath(p, out) for p in glob.glob(str(out / "**" / "*_labels.png"), recursive=True))
    expected = sorted(f"{city}/{os.path.splitext(n)[0]}_labels.png" for city in ("aachen", "bochum") for n in names)
    assert written == expected
    # Two inputs that would write the same files fail, naming both.
    a, b = str(root / "aachen" / names[0]), str(root / "bochum" / names[0])
    assert _predict(["--input", a, b, "--output", str(tmp_path / "o"), "MODEL.WEIGHTS", checkpoint] + TINY) == 1
    assert f"--input '{a}' and '{b}' would both be written" in capsys.readouterr().err
