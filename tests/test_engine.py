"""The Detectron2 engine subset (builtin, or Detectron2's own when installed): events and writers, the training
loop and its hooks, schedules, comm and launch with two gloo processes."""

import json
import os

import pytest
import torch

from uda_plugins.d2 import (
    EventStorage,
    JSONWriter,
    TensorboardXWriter,
    TrainerBase,
    comm,
    default_argument_parser,
    get_event_storage,
    hooks,
    launch,
)
from uda_plugins.engine.optim import PolyWithWarmup, build_lr_scheduler, build_optimizer


def test_event_storage_scalars_smoothing_and_scopes():
    with EventStorage(start_iter=5) as storage:
        assert get_event_storage() is storage
        for i, v in enumerate([4.0, 1.0, 3.0]):
            storage.iter = 5 + i
            storage.put_scalar("loss", v)
            storage.put_scalar("lr", v, smoothing_hint=False)
        with storage.name_scope("target"):
            storage.put_scalar("acc", 0.5)
        latest = storage.latest_with_smoothing_hint(window_size=20)
        assert latest["loss"] == (3.0, 7)  # median of 4, 1, 3
        assert latest["lr"] == (3.0, 7)  # no smoothing
        assert "target/acc" in storage.latest()
        with pytest.raises(AssertionError):
            storage.put_scalar("lr", 1.0, smoothing_hint=True)


def test_json_and_tensorboard_writers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with EventStorage() as storage:
        json_writer = JSONWriter(str(tmp_path / "metrics.json"))
        tb_writer = TensorboardXWriter(str(tmp_path))
        for it in range(3):
            storage.iter = it
            storage.put_scalar("loss", float(it))
            storage.put_image("vis", torch.zeros(3, 4, 6, dtype=torch.uint8))
            json_writer.write()
            tb_writer.write()
        json_writer.close()
        tb_writer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.json")]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [0, 1, 2]
    assert len(acc.Images("vis")) == 3


class _Recorder(hooks.HookBase):
    def __init__(self, log):
        self.log = log
        self.count = 0

    def before_train(self):
        self.log.append("before_train")

    def before_step(self):
        self.log.append(f"before_step{self.trainer.iter}")

    def after_step(self):
        self.count += 1
        self.log.append(f"after_step{self.trainer.iter}")

    def after_train(self):
        self.log.append(f"after_train{self.trainer.iter}")

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class _Loop(TrainerBase):
    def __init__(self, fail_at=None):
        super().__init__()
        self.fail_at = fail_at

    def run_step(self):
        if self.iter == self.fail_at:
            raise RuntimeError("boom")


def test_training_loop_calls_hooks_in_order_and_saves_hook_state():
    log = []
    loop = _Loop()
    rec = _Recorder(log)
    loop.register_hooks([rec, None])
    loop.train(2, 4)
    assert log == ["before_train", "before_step2", "after_step2", "before_step3", "after_step3", "after_train4"]
    assert loop.iter == 4  # finished
    state = loop.state_dict()
    assert state["iteration"] == 4 and state["hooks"]["_Recorder"] == {"count": 2}
    other = _Loop()
    rec2 = _Recorder([])
    other.register_hooks([rec2])
    other.load_state_dict(state)
    assert other.iter == 4 and rec2.count == 2


def test_after_train_runs_after_an_exception():
    log = []
    loop = _Loop(fail_at=1)
    loop.register_hooks([_Recorder(log)])
    with pytest.raises(RuntimeError):
        loop.train(0, 3)
    assert log[-1] == "after_train1"


def test_poly_with_warmup_matches_mmcv_formula():
    sched = PolyWithWarmup(max_iter=100, power=1.0, end_ratio=0.0, warmup_iters=10, warmup_ratio=1e-6)
    assert sched(0.0) == pytest.approx(1e-6)
    t = 5
    expected = (1 - t / 100) * (1 - (1 - t / 10) * (1 - 1e-6))
    assert sched(t / 100) == pytest.approx(expected)
    assert sched(0.5) == pytest.approx(0.5)
    assert sched(1.0) == pytest.approx(0.0)


def test_optimizer_groups_and_scheduler(tiny_cfg):
    from uda_plugins.d2 import build_model

    tiny_cfg.SOLVER.HEAD_LR_MULTIPLIER = 10.0
    tiny_cfg.SOLVER.WEIGHT_DECAY = 0.01
    model = build_model(tiny_cfg)
    opt = build_optimizer(tiny_cfg, model)
    by_name = {}
    for n, p in model.named_parameters():
        for g in opt.param_groups:
            if any(p is q for q in g["params"]):
                by_name[n] = (g["lr"], g["weight_decay"])
    head_conv = next(n for n in by_name if n.startswith("student.head.") and n.endswith("classifier.weight"))
    bb_conv = next(n for n in by_name if n.startswith("student.backbone.") and n.endswith("conv1.0.weight"))
    bb_norm = next(n for n in by_name if n.startswith("student.backbone.") and n.endswith("bn1.weight"))
    assert by_name[head_conv] == (pytest.approx(10 * tiny_cfg.SOLVER.BASE_LR), 0.01)
    assert by_name[bb_conv] == (pytest.approx(tiny_cfg.SOLVER.BASE_LR), 0.01)
    assert by_name[bb_norm][1] == 0.0
    sched = build_lr_scheduler(tiny_cfg, opt)
    lrs = []
    for _ in range(tiny_cfg.SOLVER.MAX_ITER):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]  # warmup, then decay


def test_argument_parser_has_the_detectron2_flags():
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            "a.yaml",
            "--resume",
            "--num-gpus",
            "2",
            "--num-machines",
            "2",
            "--machine-rank",
            "1",
            "--dist-url",
            "tcp://1.2.3.4:5",
            "SOLVER.BASE_LR",
            "0.1",
        ]
    )
    assert args.resume and args.num_gpus == 2 and args.num_machines == 2 and args.machine_rank == 1
    assert args.dist_url == "tcp://1.2.3.4:5" and args.opts == ["SOLVER.BASE_LR", "0.1"]
    assert not default_argument_parser().parse_args(["--eval-only"]).resume


def test_comm_single_process():
    assert comm.get_world_size() == 1 and comm.get_rank() == 0 and comm.is_main_process()
    assert comm.all_gather({"a": 1}) == [{"a": 1}]
    comm.synchronize()


def _collective_worker(out_dir):
    rank = comm.get_rank()
    gathered = comm.all_gather(rank * 10)
    to_zero = comm.gather(rank)
    seed = comm.shared_random_seed()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "all": gathered,
                "gather": to_zero,
                "seed": seed,
                "world": comm.get_world_size(),
                "local": comm.get_local_rank(),
            },
            f,
        )


def test_launch_two_gloo_processes(tmp_path):
    launch(_collective_worker, 2, dist_url="auto", args=(str(tmp_path),))
    r0 = json.load(open(tmp_path / "rank0.json"))
    r1 = json.load(open(tmp_path / "rank1.json"))
    assert r0["all"] == r1["all"] == [0, 10]
    assert r0["gather"] == [0, 1] and r1["gather"] == []
    assert r0["seed"] == r1["seed"] and r0["world"] == 2 and r1["local"] == 1


def test_metrics_log_pruned_on_resume_and_read_past_damage(tmp_path):
    from uda_plugins.engine.metrics_log import prune_metrics_log, read_metrics_log

    path = str(tmp_path / "metrics.json")
    with open(path, "w") as f:
        f.write("".join(json.dumps({"iteration": i, "loss": i}) + "\n" for i in range(5)) + '{"iteration": 5, "lo')
    assert [r["iteration"] for r in read_metrics_log(path)] == [0, 1, 2, 3, 4]
    appender = open(path, "a")  # the writer of the resumed run opened it before the resume
    assert prune_metrics_log(path, start_iter=3) == 3
    appender.write(json.dumps({"iteration": 3, "loss": 30}) + "\n")
    appender.close()
    assert [(r["iteration"], r["loss"]) for r in read_metrics_log(path)] == [(0, 0), (1, 1), (2, 2), (3, 30)]
    assert prune_metrics_log(str(tmp_path / "absent.json"), 3) == 0


def test_amp_precision_choice():
    from uda_plugins.engine.step import amp_dtype

    assert amp_dtype(False, "float16", "cpu") is None
    assert amp_dtype(True, "bfloat16", "cpu") == torch.bfloat16
    assert amp_dtype(True, "float16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="needs a CUDA device"):
        amp_dtype(True, "float16", "cpu")
    with pytest.raises(ValueError, match="PRECISION"):
        amp_dtype(True, "fp8", "cuda")


def test_split_batch_matches_the_rank_split():
    from uda_plugins.data.samplers import rank_positions
    from uda_plugins.engine.step import split_batch

    # One process, 2 micro-batches of a global batch of 4 == two processes with 2 images each.
    batch = {"source": rank_positions(0, 4, 0, 1), "target": [rank_positions(0, 4, 0, 1)]}
    micro = split_batch(batch, 2)
    for m in range(2):
        assert micro[m]["source"] == rank_positions(0, 4, m, 2)
        assert micro[m]["target"] == [rank_positions(0, 4, m, 2)]
    with pytest.raises(ValueError):
        split_batch({"source": [1, 2, 3]}, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs CUDA")
def test_fp16_grad_scaler_is_checkpointed():
    from uda_plugins.engine.step import UDAStepRunner

    model = torch.nn.Linear(2, 2).cuda()
    runner = UDAStepRunner(model, [], torch.optim.SGD(model.parameters(), lr=0.1), amp=torch.float16)
    runner.grad_scaler.update(new_scale=1024.0)
    state = runner.state_dict()
    other = UDAStepRunner(model, [], torch.optim.SGD(model.parameters(), lr=0.1), amp=torch.float16)
    other.load_state_dict(state)
    assert other.grad_scaler.get_scale() == 1024.0


def test_determinism_switch(tiny_cfg):
    from uda_plugins.engine.setup import set_determinism

    tiny_cfg.DETERMINISTIC = True
    tiny_cfg.CUDNN_BENCHMARK = True
    with pytest.raises(ValueError, match="CUDNN_BENCHMARK"):
        set_determinism(tiny_cfg)
    tiny_cfg.CUDNN_BENCHMARK = False
    try:
        set_determinism(tiny_cfg)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def _train_steps(cfg, steps: int = 3):
    """The model after ``steps`` optimizer steps on fixed inputs, the losses and the first step's gradients."""
    from uda_plugins.engine import UDATrainer

    torch.manual_seed(0)
    model = UDATrainer.build_model(cfg)
    opt = build_optimizer(cfg, model)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 48, 96), generator=g).float()
    labels = torch.randint(0, 19, (2, 48, 96), generator=g)
    losses, gradients = [], None
    for _ in range(steps):
        opt.zero_grad()
        out = model.student.forward_train(model.student.normalize(images))
        loss = model.student.loss(out, labels)
        loss.backward()
        gradients = gradients or {n: p.grad.clone() for n, p in model.student.named_parameters()}
        opt.step()
        losses.append(float(loss.detach()))
    return model, losses, gradients


@pytest.mark.parametrize("optimizer", ["ADAMW", "SGD"])
def test_foreach_and_fused_optimizers_take_the_same_steps(tiny_cfg, optimizer):
    tiny_cfg.SOLVER.OPTIMIZER = optimizer
    reference, _, _ = _train_steps(tiny_cfg)
    for implementation in ("foreach", "fused"):
        tiny_cfg.SOLVER.OPTIMIZER_IMPLEMENTATION = implementation
        model, _, _ = _train_steps(tiny_cfg)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.allclose(p, q, atol=2e-5), (implementation, name)  # Adam scales rounding up where v is tiny
    tiny_cfg.SOLVER.OPTIMIZER_IMPLEMENTATION = "fast"
    with pytest.raises(ValueError, match="OPTIMIZER_IMPLEMENTATION 'fast'"):
        _train_steps(tiny_cfg)


def test_channels_last_model_computes_the_same_in_nhwc(tiny_cfg):
    _, reference_losses, reference_gradients = _train_steps(tiny_cfg)
    tiny_cfg.MODEL.CHANNELS_LAST = True
    model, losses, gradients = _train_steps(tiny_cfg)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = model.student.normalize(torch.zeros(1, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    # Adam's first steps move every weight by about the learning rate whatever the sign rounding gives a gradient
    # near zero, so the weights are compared through the losses and the first gradients. Those of the stem are
    # left out: its max-pool sends the gradient of tied zeros (after the ReLU) to another of them in NHWC.
    assert losses == pytest.approx(reference_losses, rel=1e-4)
    # The first gradients differ only by the NHWC kernels' order of summation, amplified by batch-statistics
    # BatchNorm over two small images, and how much depends on the CPU's kernels and thread count: measured, the
    # worst tensor (a BatchNorm bias after a depthwise conv, a sum with cancellations) differed by 5.6e-3 of its norm
    # with one thread and 3e-6 with two. So each tensor is compared as a whole, within 5% of its norm; a wrong
    # computation in NHWC is off by the tensor's size.
    worst = max(
        (float((g - reference_gradients[name]).norm() / reference_gradients[name].norm()), name)
        for name, g in gradients.items()
        if not name.startswith("backbone.model.conv1.") and reference_gradients[name].norm() > 0
    )
    assert worst[0] < 5e-2, worst


def test_compiled_segmentors_keep_their_keys_and_compute_the_same(tiny_cfg):
    """MODEL.COMPILE compiles the networks of every segmentor in place (the student's and the teacher's here):
    the same state-dict keys, so checkpoints load either way, and the same losses and gradients. aot_eager traces
    and runs the graphs without generating kernels, which keeps the test fast; inductor is the default."""
    tiny_cfg.MODEL.META_ARCHITECTURE = "DACS"
    reference, reference_losses, reference_gradients = _train_steps(tiny_cfg, steps=2)
    tiny_cfg.MODEL.COMPILE.ENABLED = True
    tiny_cfg.MODEL.COMPILE.BACKEND = "aot_eager"
    model, losses, gradients = _train_steps(tiny_cfg, steps=2)
    compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    networks = [n for s in (model.student, model.teacher) for n in s.networks()]
    assert {id(m) for m in compiled} == {id(n) for n in networks} and len(networks) == 4
    assert model.state_dict().keys() == reference.state_dict().keys()
    model.load_state_dict(reference.state_dict())  # an eager checkpoint loads into the compiled model
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    for name, g in gradients.items():
        assert torch.allclose(g, reference_gradients[name], rtol=1e-4, atol=1e-6), name
    with torch.no_grad():  # the teacher's graph in no-grad eval mode
        model.teacher.eval()
        x = model.student.normalize(torch.zeros(1, 3, 48, 96))
        assert torch.allclose(model.teacher.predict(x), reference.teacher.eval().predict(x), atol=1e-5)


def test_segmentor_networks_hold_every_parameter(tiny_cfg):
    """What MODEL.COMPILE compiles covers the whole network of every segmentor kind: plain, HRDA (its scale
    attention too) and MCL's multi-head one (every head, not only the active one)."""
    from uda_plugins.modeling import build_segmentor
    from uda_plugins.modeling.multi_head import MultiHeadSegmentor

    hrda = tiny_cfg.clone()
    hrda.MODEL.HRDA.ENABLED = True
    hrda.MODEL.HRDA.HR_CROP_SIZE = (32, 64)
    segmentors = [build_segmentor(tiny_cfg), build_segmentor(hrda), MultiHeadSegmentor(tiny_cfg, ["a", "b", "c"])]
    for segmentor in segmentors:
        covered = {id(p) for n in segmentor.networks() for p in n.parameters()}
        assert covered == {id(p) for p in segmentor.parameters()}, type(segmentor).__name__


def _mmcv_custom_key_groups(named_parameters, base_lr: float, weight_decay: float, custom_keys: dict):
    """mmcv 1.3.7 DefaultOptimizerConstructor.add_params with paramwise_cfg custom_keys (cnn/optimizer/
    default_constructor.py L188-206), transcribed: keys sorted alphabetically then by length, longest first; the
    first key contained in the parameter's name sets its lr_mult and decay_mult; no key: lr and decay as given."""
    sorted_keys = sorted(sorted(custom_keys.keys()), key=len, reverse=True)
    groups = {}
    for name, _ in named_parameters:
        lr, wd = base_lr, weight_decay
        for key in sorted_keys:
            if key in name:
                lr = base_lr * custom_keys[key].get("lr_mult", 1.0)
                wd = weight_decay * custom_keys[key].get("decay_mult", 1.0)
                break
        groups[name] = (lr, wd)
    return groups


def test_mit_configs_param_groups_follow_mmcvs_custom_key_precedence():
    """B2: DAFormer/HRDA/MIC's MiT configs set custom_keys head (lr x10), pos_block and norm (decay 0)
    (configs/mic/gtaHR2csHR_mic_hrda.py L88-94). As released (SOLVER.HEAD_NORMS_DECAYED) every parameter's group is
    mmcv's: the heads' norms keep the decay, 9,216 parameters for MiT with HRDA's DAFormer and attention heads (the
    audit's count); the fix gives them the norm decay 0."""
    from uda_plugins.config import get_uda_cfg
    from uda_plugins.engine.optim import build_param_groups
    from uda_plugins.modeling import build_segmentor

    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "configs/gta5_cityscapes/hrda_mitb5.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAINED", "", "MODEL.TIMM.ARCH", "pvt_v2_b0"])
    model = build_segmentor(cfg)
    keys = {"head": {"lr_mult": 10.0}, "pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}}
    release = _mmcv_custom_key_groups(model.named_parameters(), cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, keys)
    modules = dict(model.named_modules())
    head_norms = [
        n
        for n, p in model.named_parameters()
        if "head" in n and isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.modules.batchnorm._NormBase)
    ]
    assert sum(p.numel() for n, p in model.named_parameters() if n in head_norms) == 9216
    for as_released in (True, False):
        cfg.SOLVER.HEAD_NORMS_DECAYED = as_released
        groups = {}
        for g in build_param_groups(cfg, model):
            for p in g["params"]:
                groups[id(p)] = (g["lr"], g["weight_decay"])
        ours = {n: groups[id(p)] for n, p in model.named_parameters() if p.requires_grad}
        differ = [n for n in ours if ours[n] != pytest.approx(release[n])]
        assert differ == ([] if as_released else head_norms)
