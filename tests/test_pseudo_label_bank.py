"""The offline pseudo-label bank: keys, atomic versioned writes, deterministic reads, pins and resume, and a
2-process commit that writes each image once."""

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from uda_plugins.d2 import launch
from uda_plugins.data.pseudo_label_bank import PseudoLabelBank, bank_keys, read_label_file, write_label_atomic
from uda_plugins.data.transforms import Geometry


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if "@" in f)


def _bank(tmp_path, n=4, keep=2):
    names = [str(tmp_path / "images" / _key(i)) + ".png" for i in range(n)]
    return PseudoLabelBank(str(tmp_path / "bank"), names, keep_pinned=keep)


def _key(i):
    return f"city{i % 2}/img{i}"


def _label(value, shape=(6, 8)):
    return np.full(shape, value, dtype=np.uint8)


def test_keys_keep_subfolders_and_must_be_unique(tmp_path):
    assert bank_keys(["/d/train/a/x.png", "/d/train/b/y.jpg"]) == ["a/x", "b/y"]
    with pytest.raises(ValueError, match="key 'x'"):
        bank_keys(["/d/a/x.png", "/d/a/x.jpg"])


def test_versions_reads_and_superseded_files(tmp_path):
    bank = _bank(tmp_path)
    bank.open()
    assert not bank.initialized
    with pytest.raises(RuntimeError, match="no label"):
        bank.read(0)
    bank.initialize((i, _label(i)) for i in range(len(bank)))
    assert bank.initialized and bank.versions.tolist() == [0, 0, 0, 0]
    assert _files(bank.root) == sorted(f"{_key(i)}@0.png" for i in range(4))

    assert bank.commit([(1, _label(10)), (2, _label(20))], iteration=5) == 2
    assert bank.versions.tolist() == [0, 6, 6, 0]
    label, version = bank.read(1)
    assert version == 6 and (label == 10).all()
    # The superseded version stays until the next commit (a reader on the old table may still open it) ...
    assert f"{_key(1)}@0.png" in _files(bank.root)
    bank.commit([(1, _label(11))], iteration=6)
    # ... and is deleted then; version 6 of image 1 is superseded in turn but not yet deleted.
    assert _files(bank.root) == sorted(
        [f"{_key(0)}@0.png", f"{_key(1)}@6.png", f"{_key(1)}@7.png", f"{_key(2)}@6.png", f"{_key(3)}@0.png"]
    )


def test_a_worker_label_read_before_a_rewrite_is_replaced_in_the_main_process(tmp_path):
    bank = _bank(tmp_path)
    bank.open()
    bank.initialize((i, _label(i, (4, 4))) for i in range(len(bank)))
    g = Geometry((4, 4), (8, 8), (2, 2, 4, 4), True)
    crop, version = bank.read_crop(3, g)  # what a prefetching worker put into a future sample
    assert crop.shape == (4, 4) and (crop == 3).all()
    assert bank.current_crop(3, g, crop, version) is crop and bank.stale_reads == 0
    bank.commit([(3, _label(30, (4, 4)))], iteration=0)
    fresh = bank.current_crop(3, g, crop, version)
    assert (fresh == 30).all() and bank.stale_reads == 1


def test_resume_restores_the_checkpoint_bank_and_removes_later_files(tmp_path):
    bank = _bank(tmp_path, keep=2)
    bank.open()
    bank.initialize((i, _label(i)) for i in range(len(bank)))
    bank.commit([(0, _label(100))], iteration=9)
    state = bank.state_dict()  # a checkpoint after iteration 9
    bank.commit([(0, _label(101)), (1, _label(111))], iteration=10)
    bank.commit([(0, _label(102))], iteration=11)
    # The run dies; a new process resumes from the checkpoint.
    resumed = _bank(tmp_path, keep=2)
    resumed.load_state_dict(state)
    resumed.open()
    assert resumed.versions.tolist() == [10, 0, 0, 0]
    assert (resumed.read(0)[0] == 100).all() and (resumed.read(1)[0] == 1).all()
    assert _files(resumed.root) == sorted([f"{_key(0)}@10.png"] + [f"{_key(i)}@0.png" for i in range(1, 4)])


def test_pinned_checkpoint_states_stay_restorable_and_older_ones_fail_loudly(tmp_path):
    bank = _bank(tmp_path, keep=2)
    bank.open()
    bank.initialize((i, _label(i)) for i in range(len(bank)))
    states = []
    for it in range(3):
        bank.commit([(0, _label(50 + it))], iteration=it)
        bank.commit([(0, _label(60 + it))], iteration=10 + it)  # a commit between checkpoints
        states.append(bank.state_dict())
    bank.commit([(0, _label(99))], iteration=50)
    bank.commit([(1, _label(98))], iteration=51)
    for state, expected in ((states[2], 62), (states[1], 61)):  # the two newest are pinned
        resumed = _bank(tmp_path, keep=2)
        resumed.load_state_dict(state)
        assert (resumed.read(0)[0] == expected).all()
    resumed = _bank(tmp_path, keep=2)
    resumed.load_state_dict(states[0])
    with pytest.raises(FileNotFoundError, match="older than the 2 newest"):
        resumed.open()


def test_load_state_dict_rejects_another_dataset(tmp_path):
    state = _bank(tmp_path, n=3).state_dict()
    with pytest.raises(ValueError, match="3 images, the dataset 4"):
        _bank(tmp_path, n=4).load_state_dict(state)


def _rewrite_forever(path, stop):
    big = [np.full((512, 1024), v, dtype=np.uint8) for v in (1, 2)]
    for b in big:
        b[::7, ::5] = 200  # not constant: a truncated PNG would decode differently or fail
    k = 0
    while not stop.is_set():
        write_label_atomic(path, big[k % 2])
        k += 1


def test_a_reader_during_writes_sees_the_old_or_the_new_file_never_a_partial_one(tmp_path):
    path = str(tmp_path / "label.png")
    write_label_atomic(path, np.full((512, 1024), 1, dtype=np.uint8))
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    writer = ctx.Process(target=_rewrite_forever, args=(path, stop))
    writer.start()
    try:
        seen = set()
        for _ in range(300):
            label = read_label_file(path)
            assert label.shape == (512, 1024)
            body = label.copy()
            body[::7, ::5] = 0
            values = np.unique(body)
            assert len(values) <= 2 and set(values.tolist()) - {0} <= {1, 2}, values
            seen.add(int(label[1, 1]))
    finally:
        stop.set()
        writer.join(10)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f] or writer.exitcode is None
    assert len(seen) == 2  # the reader did overlap the rewrites


def _two_process_commit(root, names, report):
    from uda_plugins.d2 import comm

    bank = PseudoLabelBank(root, names)
    bank.open()
    bank.initialize((i, _label(i)) for i in range(comm.get_rank(), len(names), 2))
    rank = comm.get_rank()
    # Image 2 is in both processes' batches (an epoch boundary inside one global batch), and twice in rank 1's.
    local = {0: [(0, _label(100)), (2, _label(102))], 1: [(2, _label(202)), (3, _label(103)), (2, _label(222))]}[rank]
    written = bank.commit(local, iteration=7)
    labels = [int(bank.read(i)[0][0, 0]) for i in range(4)]
    torch.save({"written": written, "versions": bank.versions.tolist(), "labels": labels}, f"{report}.{rank}")


def test_two_processes_write_each_image_once(tmp_path):
    names = [str(tmp_path / "images" / f"{i}.png") for i in range(4)]
    root, report = str(tmp_path / "bank"), str(tmp_path / "report")
    launch(_two_process_commit, 2, dist_url="auto", args=(root, names, report))
    results = [torch.load(f"{report}.{r}") for r in range(2)]
    assert [r["written"] for r in results] == [2, 1]  # rank 0 owns images 0 and 2, rank 1 image 3
    for r in results:
        assert r["versions"] == [8, 0, 8, 8]
        assert r["labels"] == [100, 1, 102, 103]
    # (the superseded version 0 files go at the next commit)
    assert _files(root) == ["0@0.png", "0@8.png", "1@0.png", "2@0.png", "2@8.png", "3@0.png", "3@8.png"]


def test_a_soft_bank_stores_probabilities_and_crops_them_bilinearly(tmp_path):
    from uda_plugins.data.pseudo_label_bank import SoftLabels
    from uda_plugins.data.transforms import apply_geometry_tensor

    names = [str(tmp_path / "images" / _key(i)) + ".png" for i in range(2)]
    bank = PseudoLabelBank(str(tmp_path / "soft"), names, codec=SoftLabels)
    bank.open()
    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(4, 6, 12, generator=g), 0).half().numpy() for _ in range(2)]
    bank.initialize(enumerate(probs))
    assert _files(bank.root) == sorted(f"{_key(i)}@0.npy" for i in range(2))
    geometry = Geometry((24, 48), (36, 72), (4, 8, 16, 32), True)  # the map is at 1/4 of the image
    crop, version = bank.read_crop(1, geometry)
    expected = apply_geometry_tensor(torch.from_numpy(probs[1]).float(), geometry)
    assert version == 0 and crop.dtype == np.float16 and crop.shape == (4, 16, 32)
    np.testing.assert_allclose(crop.astype(np.float32), expected.numpy(), atol=2e-3)
    bank.commit([(0, probs[1])], iteration=3)
    assert np.array_equal(bank.read(0)[0], probs[1]) and bank.versions.tolist() == [4, 0]
