"""SyncBN on the CPU (gloo): 4 processes with one image each normalise, update their running statistics and
back-propagate exactly as one BatchNorm over the 4 images, also on 1x1 pooled features, where a process's own
BatchNorm would see one value per channel and refuse (STAL's ASPP image pooling at one unlabelled image per GPU).
torch's own SyncBatchNorm refuses the CPU."""

import os

import torch
from torch import nn

from uda_plugins.d2 import launch
from uda_plugins.modeling.norm import SyncBatchNorm2d, get_norm

SHAPES = {"spatial": (4, 5, 3, 6), "pooled": (4, 5, 1, 1)}


def _data(shape):
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=g) * 3 + 1, torch.randn(*shape, generator=g)


def _norm(cls):
    bn = cls(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        bn.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(2))
    return bn


def _step(bn, x, w):
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * w).sum().backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "weight_grad": bn.weight.grad,
        "bias_grad": bn.bias.grad,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }


def _worker(out):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    assert isinstance(get_norm("SyncBN", 5), SyncBatchNorm2d)
    result = {}
    for name, shape in SHAPES.items():
        x, w = _data(shape)
        result[name] = _step(_norm(SyncBatchNorm2d), x.chunk(world)[rank], w.chunk(world)[rank])
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def test_four_processes_with_one_image_each_equal_one_batch_norm_over_the_four(tmp_path):
    launch(_worker, 4, dist_url="auto", args=(str(tmp_path),))
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    # The statistics are float32 sums of at most 18 values per channel and process, then of 4 partial sums: relative
    # errors of a few 1e-7 (gamma_22 = 1.3e-6 at worst), and E[x^2] - E[x]^2 loses at most E[x^2] / Var = 1.1 of that
    # here (mean 1, std 3); 1e-5 holds for any summation order.
    close = dict(rtol=1e-5, atol=1e-5)
    for name, shape in SHAPES.items():
        x, w = _data(shape)
        ref = _norm(nn.BatchNorm2d)
        expected = _step(ref, x, w)
        got = [p[name] for p in parts]
        for key in ("y", "x_grad"):
            torch.testing.assert_close(torch.cat([g[key] for g in got]), expected[key], **close, msg=f"{name} {key}")
        for key in ("weight_grad", "bias_grad"):  # each process holds its share (DDP sums and averages them)
            torch.testing.assert_close(sum(g[key] for g in got), expected[key], **close, msg=f"{name} {key}")
        for g in got:  # the whole batch's running statistics (the variance unbiased over all values) on each
            torch.testing.assert_close(g["running_mean"], expected["running_mean"], **close)
            torch.testing.assert_close(g["running_var"], expected["running_var"], **close)


def test_one_process_is_batch_norm():
    sync, plain = _norm(SyncBatchNorm2d), _norm(nn.BatchNorm2d)
    x, _ = _data(SHAPES["spatial"])
    assert torch.equal(sync(x), plain(x)) and torch.equal(sync.running_var, plain.running_var)
