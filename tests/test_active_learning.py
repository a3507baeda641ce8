"""Active learning (STAL / ILM-ASSL): image scores and per-city quotas on hand-made numbers, nested rounds, the
strategies, image lists, and the folder annotator's checks."""

import math
import os

import cv2
import numpy as np
import pytest
import torch

from uda_plugins.active_learning.annotation import AnnotationPending, FolderAnnotator, GroundTruthAnnotator
from uda_plugins.active_learning.selection import (
    SELECTION_STRATEGIES,
    allocate_quotas,
    group_of,
    image_entropy,
    select_images,
)
from uda_plugins.data.image_lists import image_keys, read_image_list, write_image_list


def test_image_score_is_the_mean_normalised_pixel_entropy():
    C = 19
    certain = torch.zeros(1, C, 2, 2)
    certain[:, 3] = 1.0
    uniform = torch.full((1, C, 2, 2), 1.0 / C)
    half = torch.zeros(1, C, 1, 2)
    half[0, 0, 0, 0] = 1.0  # one certain pixel, one uniform pixel
    half[0, :, 0, 1] = 1.0 / C
    scores = torch.cat([image_entropy(certain), image_entropy(uniform), image_entropy(half)])
    # The reference's -sum p log(p + 1e-6) / log C, pixel mean.
    uniform_value = -C * (1 / C) * math.log(1 / C + 1e-6) / math.log(C)
    assert scores.tolist() == pytest.approx(
        [-math.log(1 + 1e-6) / math.log(C), uniform_value, uniform_value / 2], abs=1e-6
    )


def test_quotas_follow_the_images_each_city_has_left():
    sizes = {"aachen": 174, "bochum": 96, "bremen": 316, "zurich": 122}
    labelled = {"aachen": 10, "bochum": 2}
    quotas = allocate_quotas(35, sizes, labelled)
    assert sum(quotas.values()) == 35
    left = {g: sizes[g] - labelled.get(g, 0) for g in sizes}
    for g in sizes:  # Hamilton: each within 1 of its exact share
        assert abs(quotas[g] - 35 * left[g] / sum(left.values())) < 1
    # The reference normalises by all images and gives the rest to the last city.
    reference = allocate_quotas(35, sizes, labelled, rule="reference")
    total = sum(sizes.values())
    assert reference == {
        "aachen": round(35 * 164 / total),
        "bochum": round(35 * 94 / total),
        "bremen": round(35 * 316 / total),
        "zurich": 35 - round(35 * 164 / total) - round(35 * 94 / total) - round(35 * 316 / total),
    }
    # A city with fewer images left than its share gives the excess to the others.
    assert allocate_quotas(6, {"a": 10, "b": 10}, {"a": 9}) == {"a": 1, "b": 5}
    with pytest.raises(ValueError, match="only 4 are not labelled"):
        allocate_quotas(5, {"a": 2, "b": 2, "c": 1}, {"a": 1})


def test_entropy_selection_takes_each_citys_most_uncertain_unlabelled_images_and_rounds_nest():
    groups = ["a"] * 6 + ["b"] * 6
    scores = np.array([0.1, 0.9, 0.5, 0.8, 0.2, 0.3, 0.7, 0.1, 0.6, 0.2, 0.95, 0.4])
    labelled = np.zeros(12, dtype=bool)
    labelled[[1, 10]] = True  # the seed set: the most uncertain of each city are already labelled
    first = select_images(4, groups, labelled, "entropy", scores)
    assert first == [2, 3, 6, 8]  # a: 0.8, 0.5; b: 0.7, 0.6 (never 1 or 10 again)
    labelled[first] = True
    second = select_images(4, groups, labelled, "entropy", scores)
    assert not set(second) & set(first) and not set(second) & {1, 10}  # nested budgets: the pool only grows
    assert second == [4, 5, 9, 11]  # a: 0.3, 0.2; b: 0.4, 0.2


def test_random_selection_is_seeded_and_uniform_within_quotas():
    groups = ["a"] * 50 + ["b"] * 50
    labelled = np.zeros(100, dtype=bool)
    picks = [select_images(10, groups, labelled, "random", rng=np.random.default_rng(s)) for s in range(300)]
    assert all(sum(i < 50 for i in p) == 5 for p in picks)  # quotas hold
    counts = np.bincount(np.concatenate(picks), minlength=100)
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()
    assert picks[0] == select_images(10, groups, labelled, "random", rng=np.random.default_rng(0))
    assert {"entropy", "random"} <= set(SELECTION_STRATEGIES._obj_map)


def _dataset(tmp_path, n=4):
    dicts = []
    for k in range(n):
        city = "aachen" if k < 2 else "bochum"
        path = tmp_path / "leftImg8bit" / "train" / city / f"{city}_{k:06d}_000019_leftImg8bit.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.zeros((6, 8, 3), np.uint8))
        dicts.append({"file_name": str(path), "height": 6, "width": 8})
    return dicts


def test_image_lists_round_trip_and_read_the_authors_format(tmp_path):
    dicts = _dataset(tmp_path)
    assert image_keys(dicts)[2] == os.path.join("bochum", "bochum_000002_000019_leftImg8bit.png")
    assert [group_of(d["file_name"]) for d in dicts] == ["aachen", "aachen", "bochum", "bochum"]
    write_image_list(str(tmp_path / "round1.txt"), dicts, [3, 0])
    assert read_image_list(str(tmp_path / "round1.txt"), dicts) == [3, 0]
    authors = tmp_path / "labeled_cs.txt"
    authors.write_text("leftImg8bit/train/bochum/bochum_000002_000019_leftImg8bit.png\n")
    assert read_image_list(str(authors), dicts) == [2]
    authors.write_text("leftImg8bit/train/bochum/bochum_000009_000019_leftImg8bit.png\n")
    with pytest.raises(ValueError, match=r"labeled_cs.txt:1: .* matches no image"):
        read_image_list(str(authors), dicts)


def test_folder_annotator_waits_for_every_label_and_rejects_a_bad_one(tmp_path):
    dicts = _dataset(tmp_path / "data")
    folder = tmp_path / "labels"
    annotator = FolderAnnotator(str(folder), num_classes=19, ignore_value=255)
    annotator.request(1, dicts, [0, 2])
    assert (folder / "round1_to_label.txt").read_text().split() == [image_keys(dicts)[0], image_keys(dicts)[2]]
    with pytest.raises(AnnotationPending, match="2 of the 2 images of round 1"):
        annotator.labels(1, dicts, [0, 2])
    good = np.full((6, 8), 4, np.uint8)
    good[0, 0] = 255
    (folder / "aachen").mkdir()
    cv2.imwrite(str(folder / "aachen" / "aachen_000000_000019_leftImg8bit.png"), good)  # named like the image
    with pytest.raises(AnnotationPending, match="1 of the 2"):
        annotator.labels(1, dicts, [0, 2])
    bad = good.copy()
    bad[1, 1] = 30  # not a class
    cv2.imwrite(str(folder / "bochum_000002_000019_leftImg8bit.png"), bad)  # or just its file name
    with pytest.raises(ValueError, match=r"bochum_000002_000019_leftImg8bit.png' has class ids \[30\]"):
        annotator.labels(1, dicts, [0, 2])
    cv2.imwrite(str(folder / "bochum_000002_000019_leftImg8bit.png"), np.zeros((5, 8), np.uint8))
    with pytest.raises(ValueError, match="is 8x5, its image 8x6"):
        annotator.labels(1, dicts, [0, 2])
    cv2.imwrite(str(folder / "bochum_000002_000019_leftImg8bit.png"), np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="one 8-bit channel"):
        annotator.labels(1, dicts, [0, 2])
    cv2.imwrite(str(folder / "bochum_000002_000019_leftImg8bit.png"), good)
    labels = annotator.labels(1, dicts, [0, 2])
    assert sorted(labels) == [0, 2] and all(os.path.isfile(p) for p in labels.values())


def test_ground_truth_annotator_reveals_the_dataset_labels_or_says_it_cannot(tmp_path):
    dicts = _dataset(tmp_path)
    with pytest.raises(ValueError, match="no ground truth to reveal"):
        GroundTruthAnnotator().labels(0, dicts, [1])
    dicts[1]["sem_seg_file_name"] = "/x/label.png"
    assert GroundTruthAnnotator().labels(0, dicts, [1]) == {1: "/x/label.png"}


def test_round_tool_grows_nested_lists_and_waits_for_folder_labels(tmp_path, capsys):
    import shutil
    import sys

    from conftest import REPO, tiny_overrides

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import active_learning_round

    from uda_plugins.data.build import get_dataset_dicts

    config = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")
    opts = tiny_overrides(str(tmp_path / "unused"))
    common = ["--config-file", config, "--network", "student"]
    first, second = str(tmp_path / "round1.txt"), str(tmp_path / "round2.txt")
    assert active_learning_round.main(common + ["--num", "4", "--strategy", "random", "--output", first] + opts) == 0
    assert active_learning_round.main(common + ["--num", "4", "--labelled", first, "--output", second] + opts) == 0
    dicts = get_dataset_dicts(["synthetic_tiny_target_train"])
    one, two = read_image_list(first, dicts), read_image_list(second, dicts)
    assert len(one) == 4 and two[:4] == one and len(set(two)) == 8  # nested: the first round's images stay
    with open(second + ".scores.tsv") as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1:]]
    scores = [float(s) for s, _ in rows]
    assert len(rows) == len(dicts) and scores == sorted(scores, reverse=True)
    with open(second + ".round.json") as f:
        summary = __import__("json").load(f)
    assert summary["round"] == 2 and summary["labelled_after"] == 8 and summary["strategy"] == "entropy"
    # The new images are the most uncertain of their cities among those not labelled.
    by_key = {k: float(s) for s, k in rows}
    keys = image_keys(dicts)
    for i in two[4:]:
        city = group_of(dicts[i]["file_name"])
        rest = [by_key[keys[j]] for j in range(len(dicts)) if group_of(dicts[j]["file_name"]) == city and j not in two]
        assert all(by_key[keys[i]] >= r for r in rest)

    # Folder mode: the tool asks (exit 3) until every label is in the folder, and rejects a bad one.
    folder = tmp_path / "people"
    third = str(tmp_path / "round3.txt")
    args = common + ["--num", "2", "--labelled", second, "--output", third, "--annotator", "folder"]
    args += ["--label-folder", str(folder)] + opts
    assert active_learning_round.main(args) == 3
    assert "waiting for labels: 2 of the 2 images of round 3" in capsys.readouterr().err
    requested = read_image_list(str(folder / "round3_to_label.txt"), dicts)
    for k, i in enumerate(requested):
        target = folder / os.path.basename(dicts[i]["file_name"])
        shutil.copy(dicts[i]["sem_seg_file_name"], target)
        if k == 0:
            label = cv2.imread(str(target), cv2.IMREAD_UNCHANGED)
            label[0, 0] = 77
            cv2.imwrite(str(target), label)
    assert active_learning_round.main(args) == 1
    assert "has class ids [77]" in capsys.readouterr().err
    shutil.copy(dicts[requested[0]]["sem_seg_file_name"], folder / os.path.basename(dicts[requested[0]]["file_name"]))
    assert active_learning_round.main(args) == 0
    assert read_image_list(third, dicts) == two + requested

    # By default the images labelled so far are the config's (here a random seed set, drawn as training drew it).
    from uda_plugins.data.build import image_subset

    seeded = str(tmp_path / "after_seed_set.txt")
    argv = common + ["--num", "2", "--output", seeded] + opts + ["DATASETS.TARGET_LABELED_LIST", "random:4"]
    assert active_learning_round.main(argv) == 0
    after = read_image_list(seeded, dicts)
    assert after[:4] == image_subset("random:4", dicts, 0) and len(set(after)) == 6


def test_labelled_target_images_join_the_source_stream_oversampled_as_released(tmp_path):
    from conftest import REPO, tiny_overrides

    from uda_plugins.config import get_uda_cfg
    from uda_plugins.data.build import build_uda_train_loader, get_dataset_dicts
    from uda_plugins.methods.source_only import SourceOnly

    targets = get_dataset_dicts(["synthetic_tiny_target_train"])
    write_image_list(str(tmp_path / "labelled.txt"), targets, [1, 5, 9])
    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "synthetic", "source_only.yaml"))
    cfg.merge_from_list(
        tiny_overrides(str(tmp_path / "out"), **{"DATASETS.TARGET_LABELED_LIST": str(tmp_path / "labelled.txt")})
    )
    loader = build_uda_train_loader(cfg, SourceOnly.data_requirements)
    stream = loader.dataset.source
    sources = get_dataset_dicts(["synthetic_tiny_source_train"])
    assert len(stream.dataset) == len(sources) + len(targets) - 3  # the target images fill 24 - 3 entries
    added = [stream.dataset[i]["file_name"] for i in range(len(sources), len(stream.dataset))]
    assert added[:6] == [targets[i]["file_name"] for i in (1, 5, 9, 1, 5, 9)]
    cfg.DATASETS.TARGET_LABELED_ENTRIES = 5
    assert len(build_uda_train_loader(cfg, SourceOnly.data_requirements).dataset.source.dataset) == len(sources) + 5
    # A subset of the source (ILM-ASSL trains on 2000 GTA5 images): a list or random:<n>.
    write_image_list(str(tmp_path / "source.txt"), sources, [0, 2, 4])
    cfg.DATASETS.SOURCE_LIST = str(tmp_path / "source.txt")
    stream = build_uda_train_loader(cfg, SourceOnly.data_requirements).dataset.source
    assert [stream.dataset[i]["file_name"] for i in range(4)] == [sources[i]["file_name"] for i in (0, 2, 4)] + [
        targets[1]["file_name"]
    ]
    cfg.DATASETS.SOURCE_LIST = "random:7"
    assert len(build_uda_train_loader(cfg, SourceOnly.data_requirements).dataset.source.dataset) == 7 + 5
    cfg.DATALOADER.RCS.ENABLED = True
    with pytest.raises(ValueError, match="DATASETS.TARGET_LABELED_LIST with DATALOADER.RCS.ENABLED"):
        build_uda_train_loader(cfg, SourceOnly.data_requirements)


def test_rounds_inside_a_run_grow_the_pool_and_checkpoint_it(tmp_path, capsys):
    import sys

    from conftest import REPO, tiny_overrides

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train_net

    from uda_plugins.data.build import get_dataset_dicts
    from uda_plugins.engine.metrics_log import read_metrics_log

    config = os.path.join(REPO, "configs", "synthetic", "stal.yaml")
    out = str(tmp_path / "run")
    extra = {
        "DATASETS.TARGET_LABELED_LIST": "random:3",
        "UDA.STAL.OHEM_MIN_KEPT": 200,
        "UDA.ACTIVE.ROUND_ITERS": "(2, 4)",
        "UDA.ACTIVE.ROUND_IMAGES": "(2, 3)",
        "SOLVER.MAX_ITER": 5,
        "TEST.EVAL_PERIOD": 0,
    }
    assert train_net.cli(["--config-file", config] + tiny_overrides(out, **extra)) == 0
    dicts = get_dataset_dicts(["synthetic_tiny_target_train"])
    folder = os.path.join(out, "active_learning")
    first, second = (read_image_list(os.path.join(folder, f"round{k}.txt"), dicts) for k in (1, 2))
    pool = read_image_list(os.path.join(folder, "labelled_after_round2.txt"), dicts)
    assert len(first) == 2 and len(second) == 3 and len(pool) == 8 and set(first) | set(second) < set(pool)
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["trainer"]["hooks"]
    (rounds,) = [v["labelled_in_round"] for k, v in state.items() if "ActiveLearning" in k]
    assert torch.bincount(rounds).tolist() == [len(dicts) - 8, 3, 2, 3]  # seed set, round 1, round 2
    assert sorted(torch.nonzero(rounds == 2).flatten().tolist()) == sorted(first)
    logged = {
        r["iteration"]: r["active/labelled_images"]
        for r in read_metrics_log(os.path.join(out, "metrics.json"))
        if "active/labelled_images" in r
    }
    assert logged == {1: 5, 3: 8}
    bad = tiny_overrides(str(tmp_path / "bad"), **dict(extra, **{"UDA.ACTIVE.ROUND_IMAGES": "(2,)"}))
    capsys.readouterr()
    assert train_net.cli(["--config-file", config] + bad) == 1
    assert "UDA.ACTIVE.ROUND_ITERS (2, 4) and ROUND_IMAGES (2,) must pair up" in capsys.readouterr().err


def test_benchmark_pairs_each_evaluation_with_the_labelled_images_it_trained_on(tmp_path, capsys):
    import sys

    from conftest import REPO, tiny_overrides

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import active_learning_benchmark

    configs = [os.path.join(REPO, "configs", "synthetic", f"stal_rounds_{s}.yaml") for s in ("entropy", "random")]
    extra = {
        "DATASETS.TARGET_LABELED_LIST": "random:3",
        "UDA.STAL.OHEM_MIN_KEPT": 200,
        "UDA.ACTIVE.ROUND_ITERS": "(2, 4)",
        "UDA.ACTIVE.ROUND_IMAGES": "(2, 1)",
        "SOLVER.MAX_ITER": 6,
        "TEST.EVAL_PERIOD": 2,
        "VIS_PERIOD": 0,
    }
    opts = tiny_overrides("unused", **extra)
    at = opts.index("OUTPUT_DIR")
    opts = opts[:at] + opts[at + 2 :]  # the sweep sets OUTPUT_DIR per run
    argv = ["--configs", *configs, "--seeds", "0", "--output-dir", str(tmp_path)] + opts
    assert active_learning_benchmark.main(argv) == 0
    out = capsys.readouterr().out
    assert all(f" {n} labelled |" in out for n in (3, 5, 6))  # the seed set, +2, +1
    assert "stal_rounds_entropy" in out and "stal_rounds_random" in out
    chart = cv2.imread(str(tmp_path / "active_learning.png"))
    assert chart is not None and chart.shape[2] == 3 and (chart != 255).any()
    assert os.path.isfile(tmp_path / "active_learning.md")


def test_ilm_assl_lists_split_into_source_and_target_lists(tmp_path):
    import sys

    from conftest import REPO

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_ilm_assl_list

    source, target = convert_ilm_assl_list.split_list(
        [
            "leftImg8bit/train/hamburg/hamburg_000000_080169_leftImg8bit.png\n",
            "leftImg8bit/train/gta5/gta5_00838_000019_leftImg8bit.png\n",
            "leftImg8bit/train/synthia/synthia_0000041_000019_leftImg8bit.png\n",
            "\n",
        ]
    )
    assert source == ["images/00838.png", "RGB/0000041.png"]
    assert target == ["leftImg8bit/train/hamburg/hamburg_000000_080169_leftImg8bit.png"]
    # The GTA5 line names the GTA5 image under this project's layout.
    dicts = [{"file_name": str(tmp_path / "gta5" / "images" / f"{k:05d}.png")} for k in (838, 839)]
    (tmp_path / "src.txt").write_text(source[0] + "\n")
    assert read_image_list(str(tmp_path / "src.txt"), dicts) == [0]


def test_stal_paper_configs_train_on_the_releases_2000_source_images(tmp_path):
    # A6: ILM-ASSL's labelled pool is 2000 source images plus the labelled Cityscapes images (its labeled.txt,
    # cityscapes_semi_cp.py:113-131). The paper configs require the source list the conversion tool writes beside the
    # target list, and a missing list fails naming the key and the command that makes it.
    import glob
    import re

    from conftest import REPO, tiny_overrides

    from uda_plugins.config import get_uda_cfg
    from uda_plugins.data.build import build_uda_train_loader
    from uda_plugins.methods.source_only import SourceOnly

    configs = sorted(glob.glob(os.path.join(REPO, "configs", "*_cityscapes", "stal_dlv3p_r101_*.yaml")))
    assert len(configs) == 6
    for path in configs:
        cfg = get_uda_cfg()
        cfg.merge_from_file(path)
        source_list, target_list = cfg.DATASETS.SOURCE_LIST, cfg.DATASETS.TARGET_LABELED_LIST
        assert source_list == os.path.join(os.path.dirname(target_list), "source_2000.txt"), path
        header = " ".join(line[2:] for line in open(path) if line.startswith("# ")).replace("\n", " ")
        command = re.search(r"'python (tools/convert_ilm_assl_list\.py [^']+)'", " ".join(header.split()))
        assert command and f"--source-out {source_list} --target-out {target_list}" in command.group(1), path
    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "synthetic", "source_only.yaml"))
    missing = str(tmp_path / "datasets" / "lists" / "ilm_assl" / "gtav2cityscapes" / "source_2000.txt")
    cfg.merge_from_list(tiny_overrides(str(tmp_path / "out"), **{"DATASETS.SOURCE_LIST": missing}))
    with pytest.raises(FileNotFoundError, match=r"DATASETS.SOURCE_LIST '.*' does not exist: .*convert_ilm_assl_list"):
        build_uda_train_loader(cfg, SourceOnly.data_requirements)
    cfg.DATASETS.SOURCE_LIST, cfg.DATASETS.TARGET_LABELED_LIST = "", str(tmp_path / "labelled.txt")
    with pytest.raises(FileNotFoundError, match=r"DATASETS.TARGET_LABELED_LIST '.*labelled.txt' does not exist"):
        build_uda_train_loader(cfg, SourceOnly.data_requirements)
