"""tools/benchmark.py: a training measurement with its FLOPs, a reference config fed the synthetic pair at its own
input sizes, and the inference measurement."""

import os
import re
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(REPO, "tools"))
import benchmark  # noqa: E402

from uda_plugins.config import get_uda_cfg  # noqa: E402
from uda_plugins.engine import UDATrainer  # noqa: E402

SYNTHETIC = os.path.join(REPO, "configs", "synthetic")
GTA5_CS = os.path.join(REPO, "configs", "gta5_cityscapes")
# A reference config small enough for a test: MiT-B0 instead of B5, small crops.
SMALL_MIT = ["MODEL.DEVICE", "cpu", "MODEL.TIMM.ARCH", "mit_b0", "SOLVER.AMP.ENABLED", "False"]


def _row(out: str, first_cell: str) -> dict:
    """The table row starting with ``first_cell`` as {header of its table: cell}."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    headers = []
    for line, below in zip(lines, lines[1:] + [""]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if below.startswith("|-"):  # a table's header line
            headers = cells
        elif cells[0] == first_cell:
            return dict(zip(headers, cells))
    raise AssertionError(f"no row '{first_cell}' in\n{out}")


def test_depthwise_convolution_backward_costs_two_forwards():
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        y = conv(x)
    with benchmark.flop_counter() as both:
        conv(x).sum().backward()
    assert forward.get_total_flops() == 2 * 2 * 64 * 9 * 16 * 16
    assert both.get_total_flops() == 3 * forward.get_total_flops()
    del y


def test_training_step_flops_are_forward_plus_backward(tmp_path, capsys):
    opts = tiny_overrides(str(tmp_path / "unused"))
    argv = ["--config-file", os.path.join(SYNTHETIC, "source_only.yaml"), "--iters", "2", "--warmup", "1"] + opts
    assert benchmark.main(argv) == 0
    row = _row(capsys.readouterr().out, "source_only.yaml")
    step_gflops = float(row["GFLOP/it"])
    # One forward of the student on the same batch shape: a step is it plus a backward of about twice its cost
    # (less than twice: the first layer needs no gradient of its input).
    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(SYNTHETIC, "source_only.yaml"))
    cfg.merge_from_list(opts)
    model = UDATrainer.build_model(cfg)
    student = model.student
    batch = torch.zeros(cfg.SOLVER.IMS_PER_BATCH_SOURCE, 3, 48, 96)
    counter = FlopCounterMode(display=False)  # torch's forward formulas are right
    with counter:
        student.predict(student.normalize(batch))
    forward_gflops = counter.get_total_flops() / 1e9
    assert 2.0 * forward_gflops < step_gflops <= 3.0 * forward_gflops + 0.001  # (printed to 4 digits)
    assert float(row["TFLOP/s"]) > 0 and row["of peak"] == "-"  # no known peak on the CPU
    assert float(row["first it s"]) > 0
    assert float(row["loader headroom"].rstrip("x")) > 1  # reading 2 tiny images is faster than a training step


def test_reference_config_runs_on_the_synthetic_pair_at_its_own_sizes(tmp_path, capsys):
    config = os.path.join(GTA5_CS, "daformer_mitb5.yaml")
    crops = ["INPUT.SOURCE.CROP_SIZE", "[64, 64]", "INPUT.TARGET.CROP_SIZE", "[64, 64]"]
    argv = ["--config-file", config, "--synthetic-data", "synthetic_tiny", "--iters", "1", "--warmup", "1"]
    assert (
        benchmark.main(argv + SMALL_MIT + crops + ["SOLVER.IMS_PER_BATCH_SOURCE", "1", "DATALOADER.NUM_WORKERS", "0"])
        == 0
    )
    out = capsys.readouterr().out
    row = _row(out, "daformer_mitb5.yaml")
    assert float(row["GFLOP/it"]) > 0
    assert "mix_mask_augment" in out  # DACS ran, with its teacher
    cfg = get_uda_cfg()
    cfg.merge_from_file(config)
    overrides = dict(zip(*[iter(benchmark.synthetic_data_overrides(cfg))] * 2))
    assert overrides["DATASETS.SOURCE_TRAIN"] == "('synthetic_source_train',)"
    assert overrides["MODEL.BACKBONE.PRETRAINED"] == "" and overrides["MODEL.WEIGHTS"] == ""
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 7
    with pytest.raises(ValueError, match="19-class"):
        benchmark.synthetic_data_overrides(cfg)


def test_inference_speed_of_sliding_windows(tmp_path, capsys):
    config = os.path.join(GTA5_CS, "mic_hrda_mitb5.yaml")
    windows = ["TEST.SLIDE_CROP_SIZE", "[64, 64]", "TEST.SLIDE_STRIDE", "[32, 32]"]
    argv = ["--config-file", config, "--synthetic-data", "synthetic_tiny", "--inference", "1", "--size", "64", "128"]
    assert benchmark.main(argv + SMALL_MIT + windows) == 0
    out = capsys.readouterr().out
    row = _row(out, "cpu")
    assert row["image"] == "64x128" and re.fullmatch(r"slide \(64, 64\) x3", row["TEST.MODE"])
    assert float(row["images/s"]) > 0 and float(row["GFLOP/image"]) > 0


def test_oracle_forward_counts_as_network_compute(tmp_path, capsys):
    """TargetOnly's forward is timed as the student's, not left in "other" (where it read as 27% machinery)."""
    argv = ["--config-file", os.path.join(SYNTHETIC, "target_only.yaml"), "--iters", "1", "--warmup", "1"]
    assert benchmark.main(argv + tiny_overrides(str(tmp_path / "unused"))) == 0
    assert float(_row(capsys.readouterr().out, "student_forward")["share of step"].rstrip("%")) > 10


def test_timed_sections_must_not_nest():
    from uda_plugins.utils.profiling import collect_timings, timed

    with timed("a"), timed("b"):  # nothing collects: free, and nesting is harmless
        pass
    with collect_timings() as sections:
        with pytest.raises(RuntimeError, match="'b' inside 'a'"):
            with timed("a"), timed("b"):
                pass
        with timed("b"):  # the failed section closed cleanly
            pass
    assert set(sections) == {"a", "b"}


TWO_TARGETS = "('synthetic_tiny_target_train', 'synthetic_tiny_target_dusk_train')"


@pytest.mark.parametrize(
    "config, extra",
    [
        ("mic_gt.yaml", []),
        ("quadmix.yaml", ["UDA.QUADMIX.START_ITER", "0"]),
        (
            "duda.yaml",
            ["UDA.DUDA.SOURCE_WARMUP_ITERS", "0", "UDA.DUDA.UPDATE_START", "0", "INPUT.TARGET.CROP_SIZE", "(32, 64)"],
        ),
        ("stal.yaml", ["UDA.STAL.CONTRASTIVE_START_ITER", "0"]),
        ("mcl_warmup.yaml", ["DATASETS.TARGET_TRAIN", TWO_TARGETS]),
        ("mcl.yaml", ["DATASETS.TARGET_TRAIN", TWO_TARGETS]),
    ],
)
def test_every_step_is_timed_in_disjoint_sections(config, extra, tmp_path, capsys):
    """A method's sections do not nest (the benchmark raises if they do) and cover no more than the step."""
    argv = ["--config-file", os.path.join(SYNTHETIC, config), "--iters", "1", "--warmup", "1"]
    assert benchmark.main(argv + tiny_overrides(str(tmp_path / "unused")) + extra) == 0
    out = capsys.readouterr().out
    assert float(_row(out, "other (hooks, metrics, host<->device)")["s/it"]) >= 0
    assert float(_row(out, "student_forward")["s/it"]) > 0


def test_machinery_share_leaves_out_every_network():
    sections = {"student_forward": 0.3, "discriminators": 0.2, "backward": 0.3, "mixing": 0.1, "data_wait": 0.05}
    table = benchmark.breakdown_table(sections, [1.0])  # section totals over one 1-second iteration
    row = _row(table, "adaptation machinery (not network, not data)")
    assert float(row["s/it"]) == pytest.approx(0.15)  # mixing 0.1 + the 0.05 of the step no section covers ("other")
