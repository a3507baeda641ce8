"""Output-level discriminators with one backward: the generator term trains only the segmenter, the discriminator
term only the discriminator, and their sum gives the reference's two backward passes' gradients; the composite
optimizer (SGD + Adam) schedules, checkpoints and scales as one."""

import math

import pytest
import torch

from uda_plugins.config import get_uda_cfg
from uda_plugins.engine.optim import CompositeOptimizer, build_lr_scheduler, build_optimizer
from uda_plugins.modeling.discriminator import (
    OutputDiscriminator,
    discriminator_loss,
    generator_loss,
    self_information,
)


def _setup(seed=0):
    torch.manual_seed(seed)
    segmenter = torch.nn.Conv2d(3, 5, 3, padding=1)
    disc = OutputDiscriminator(5, width=8)
    source, target = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    return segmenter, disc, source, target


def _maps(segmenter, source, target):
    return (self_information(torch.softmax(segmenter(x), 1)) for x in (source, target))


def test_self_information_sums_to_the_normalised_entropy():
    probs = torch.softmax(torch.randn(2, 7, 4, 4), 1)
    entropy = -(probs * probs.log()).sum(1) / math.log(7)
    torch.testing.assert_close(self_information(probs).sum(1), entropy, rtol=1e-5, atol=1e-6)
    assert OutputDiscriminator(7)(torch.zeros(1, 7, 64, 64)).shape == (1, 1, 4, 4)  # four stride-2 convs


def test_each_term_reaches_only_its_network_and_the_sum_equals_two_backward_passes():
    segmenter, disc, source, target = _setup()
    s_map, t_map = _maps(segmenter, source, target)
    generator_loss(disc, t_map).backward()
    assert segmenter.weight.grad is not None and all(p.grad is None for p in disc.parameters())

    segmenter, disc, source, target = _setup()
    s_map, t_map = _maps(segmenter, source, target)
    discriminator_loss(disc, s_map, t_map).backward()
    assert segmenter.weight.grad is None and all(p.grad is not None for p in disc.parameters())

    # One backward of the sum ...
    segmenter, disc, source, target = _setup()
    s_map, t_map = _maps(segmenter, source, target)
    (0.001 * generator_loss(disc, t_map) + discriminator_loss(disc, s_map, t_map)).backward()
    ours = [p.grad.clone() for p in list(segmenter.parameters()) + list(disc.parameters())]
    # ... equals the reference's: D frozen for the generator term, then the D term on detached maps.
    segmenter, disc, source, target = _setup()
    s_map, t_map = _maps(segmenter, source, target)
    for p in disc.parameters():
        p.requires_grad_(False)
    logits = disc(t_map)
    (0.001 * torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))).backward()
    for p in disc.parameters():
        p.requires_grad_(True)
    ds, dt = disc(s_map.detach()), disc(t_map.detach())
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    (bce(ds, torch.zeros_like(ds)) + bce(dt, torch.ones_like(dt))).backward()
    reference = [p.grad for p in list(segmenter.parameters()) + list(disc.parameters())]
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b)


class _WithDiscriminator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 5, 1)
        self.discriminator = OutputDiscriminator(5, width=8)

    def separate_optimizers(self, cfg):
        return [torch.optim.Adam(self.discriminator.parameters(), lr=1e-4, betas=(0.9, 0.99))]


def test_a_composite_optimizer_schedules_checkpoints_and_scales_as_one():
    cfg = get_uda_cfg()
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS = "SGD", 0.1, 10, 0
    cfg.SOLVER.HEAD_LR_MULTIPLIER = 1.0
    model = _WithDiscriminator()
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, CompositeOptimizer)
    main, adam = optimizer.optimizers
    assert {id(p) for g in main.param_groups for p in g["params"]} == {id(p) for p in model.head.parameters()}
    scheduler = build_lr_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(3):
        optimizer.zero_grad()
        out = model.head(torch.randn(2, 3, 32, 32))
        scaler.scale(out.mean() + model.discriminator(out).mean()).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    factor = (1 - 3 / 10) ** cfg.SOLVER.POLY_LR_POWER  # the poly schedule scales both optimizers' rates
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * factor, 1e-4 * factor])
    state = optimizer.state_dict()
    fresh = build_optimizer(cfg, model)
    fresh.load_state_dict(state)
    assert torch.equal(
        fresh.optimizers[1].state_dict()["state"][0]["exp_avg"], adam.state_dict()["state"][0]["exp_avg"]
    )
    with pytest.raises(ValueError, match="2 optimizers, this model 1"):
        CompositeOptimizer([torch.optim.SGD(model.head.parameters(), lr=0.1)]).load_state_dict(state)
