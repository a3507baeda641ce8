"""lhoyer/MIC's own mmseg code, imported from a local checkout, for the parity tests (tests/test_release_parity.py).

The release's modules import unmodified with the pure-Python mmcv 1.7.2 (docs/release-audit/
models-and-checkpoint-conversion.md). Two environment variables say where they are; without them the parity tests
skip, like the Detectron2 tests without Detectron2:

* ``UDA_RELEASE_MIC``: the ``seg/`` folder of a lhoyer/MIC checkout (it holds ``mmseg/``);
* ``UDA_RELEASE_SITE``: a folder with mmcv 1.7.2 (built with ``MMCV_WITH_OPS=0``), kornia 0.5.8 (the release's pin)
  and mmcv's small pure-Python dependencies, installed with ``pip install --target``.

``tools/setup_release_parity.sh`` builds both outside the repository and prints the two ``export`` lines. Both
folders go at the *end* of ``sys.path``, so nothing there shadows a package of this environment (torch, timm, numpy).

One step of the release and one of ours are compared "from the same random draws": our step runs first and its
draws are recorded (:class:`Recorder`); the release's step then runs with each of its draw calls answered from
that record (:class:`ReleaseDraws`): Python's ``random.uniform`` (the jitter and blur decisions), NumPy's
``random.choice`` (ClassMix's classes), ``random.uniform`` (the blur sigma) and ``random.randint`` (HRDA's detail
crop offsets), and kornia's ``ColorJitter.generate_parameters`` (the jitter factors and step order). Each answer is
checked against what the release asks for (the number of candidates, the range), so a difference in *what* is drawn
fails there; a difference in how *many* independent draws there are (the release draws per image where ours drew
one for the batch) is recorded as a finding (:attr:`ReleaseDraws.findings`) that a test can assert on. MIC's block
mask is not replayed but drawn by both sides' own code from the same seeded torch generator.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from torch import nn

ENV_MIC = "UDA_RELEASE_MIC"
ENV_SITE = "UDA_RELEASE_SITE"
SETUP_HINT = "tools/setup_release_parity.sh builds it and prints the exports"


def release_mmseg():
    """Import the release's ``mmseg`` (and check mmcv/kornia), or skip the calling test module with the reason."""
    mic, site = os.environ.get(ENV_MIC, ""), os.environ.get(ENV_SITE, "")
    if not mic or not site:
        pytest.skip(f"needs lhoyer/MIC's seg/ in ${ENV_MIC} and mmcv 1.7.2 in ${ENV_SITE} ({SETUP_HINT})", True)
    for var, path, inside in ((ENV_MIC, mic, "mmseg"), (ENV_SITE, site, "mmcv")):
        if not os.path.isdir(os.path.join(path, inside)):
            pytest.fail(f"${var}={path} has no {inside}/ folder ({SETUP_HINT})")
    for path in (site, mic):
        if path not in sys.path:
            sys.path.append(path)
    import mmcv

    # MIC's mmseg/__init__.py asserts mmcv <= 1.4.0 (its README pins mmcv-full 1.3.7); 1.7.2 is the last release
    # that still installs without compiled ops and runs the code unmodified.
    mmcv.__version__ = "1.3.7"
    import kornia
    import mmseg  # noqa: F401
    import mmseg.models  # noqa: F401  (registers the backbones, heads, segmentors and UDA modules)

    if kornia.__version__ != "0.5.8":
        pytest.fail(f"${ENV_SITE} has kornia {kornia.__version__}; the release pins 0.5.8 ({SETUP_HINT})")
    return mmseg


# ------------------------------------------------------------------------------------------------ weights
@torch.no_grad()
def perturb_(module: nn.Module, generator: torch.Generator) -> None:
    """Random affine parameters and running statistics for every norm and a random bias for every conv/linear
    layer, so that a mis-mapped norm or bias shows in the outputs (initialisation leaves them 1/0)."""

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype)

    for m in module.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
            if m.weight is not None:
                m.weight.copy_(1 + 0.2 * randn(m.weight))
                m.bias.copy_(0.1 * randn(m.bias))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(0.1 * randn(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
        elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            m.bias.copy_(0.02 * randn(m.bias))


def release_state_as_ours(state: Dict[str, torch.Tensor], model: nn.Module, prefix: str = "model.") -> Dict:
    """Release tensors named as in the release's UDA module (``model.*``, ``ema_model.*``, ...) -> our names, through
    the project's own checkpoint converter (so gradients and buffers are mapped exactly like weights are)."""
    from uda_plugins.modeling.mmseg_conversion import convert_mmseg_checkpoint

    converted, unused = convert_mmseg_checkpoint({"state_dict": state}, model)
    assert not [k for k in unused if k.startswith(prefix)], f"release tensors with no counterpart: {unused[:5]}"
    return converted


# --------------------------------------------------------------------------------------------- recording
class Recorder:
    """Wraps callables of our step and keeps what they returned (and were given), in call order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.calls: Dict[str, List[Tuple[tuple, dict, Any]]] = {}

    def wrap(self, owner: Any, name: str, key: Optional[str] = None, before: Optional[Callable] = None) -> None:
        original = getattr(owner, name)
        calls = self.calls.setdefault(key or name, [])

        @functools.wraps(original)
        def recorded(*args, **kwargs):
            out = before(original, *args, **kwargs) if before else original(*args, **kwargs)
            calls.append((args, kwargs, out))
            return out

        self.monkeypatch.setattr(owner, name, recorded)

    def outputs(self, key: str) -> list:
        return [out for _, _, out in self.calls.get(key, [])]


class RandpermRecorder:
    """Stands in for the ``torch`` module inside one of our modules: every ``randperm`` (ClassMix's class choice) is
    recorded as (n, permutation); everything else is torch's."""

    def __init__(self) -> None:
        self.draws: List[Tuple[int, torch.Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def randperm(self, n: int, *args, **kwargs) -> torch.Tensor:
        out = torch.randperm(n, *args, **kwargs)
        self.draws.append((int(n), out.clone().cpu()))
        return out


def seeded(seed: int) -> Callable:
    """A ``before`` for :meth:`Recorder.wrap`: call the original with torch's global generator seeded, without
    moving the caller's stream (so the same draw can be made by the other side's own code)."""

    def call(original, *args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return original(*args, **kwargs)

    return call


# ------------------------------------------------------------------------------------------------ replay
class _Queue:
    def __init__(self, name: str) -> None:
        self.name, self.items = name, deque()

    def push(self, item: Any) -> None:
        self.items.append(item)

    def pop(self, what: str) -> Any:
        if not self.items:
            raise AssertionError(f"the release drew one more {self.name} than our step ({what})")
        return self.items.popleft()


class _PythonRandom:
    """``random`` in a release module: ``uniform(0, 1)`` answered from a queue."""

    def __init__(self, queue: _Queue) -> None:
        self.queue = queue

    def uniform(self, a: float, b: float) -> float:
        assert (a, b) == (0, 1), f"the release draws U({a}, {b}) where ours decides with U(0, 1)"
        return self.queue.pop(f"random.uniform({a}, {b})")


class _NumpyRandom:
    def __init__(self, draws: "ReleaseDraws") -> None:
        self.draws = draws

    def __getattr__(self, name: str) -> Any:
        return getattr(np.random, name)

    def choice(self, n, k, replace=True):
        """ClassMix (dacs_transforms.py:95-96): ``k`` of ``n`` candidate classes; ours drew a permutation of its own
        candidates, whose first ``k`` are the choice when both sides have the same candidates."""
        ours_n, perm = self.draws.classes.pop(f"np.random.choice({n}, {k})")
        assert not replace
        assert ours_n == n, f"ClassMix: the release chooses from {n} candidate classes, ours from {ours_n} (A1)"
        assert k == (n + n % 2) // 2
        return perm[:k].numpy()

    def uniform(self, low, high):
        assert (low, high) == (0.15, 1.15), f"blur sigma ~ U({low}, {high}) in the release"
        return self.draws.sigma.pop(f"np.random.uniform({low}, {high})")

    def randint(self, low, high):
        """HRDA's detail crop offset (hrda_encoder_decoder.py:26-27): ``randint(0, (margin + 1) // divisible)``."""
        index = self.draws.crop_offsets.pop(f"np.random.randint({low}, {high})")
        if not low <= index < high:
            self.draws.findings.append(f"HRDA crop offset index {index} outside the release's [{low}, {high}) (B1)")
        return index


class _NumpyProxy:
    def __init__(self, draws: "ReleaseDraws") -> None:
        self.random = _NumpyRandom(draws)

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


class ReleaseDraws:
    """The release's random draws, answered from our step's (see the module docstring). Fill the queues with
    :meth:`add_strong_aug`, :meth:`add_class_draws`, :meth:`add_crop_boxes`, then ``with draws.patched(...)``."""

    def __init__(self) -> None:
        self.decisions = {"dacs": _Queue("jitter/blur decision (DACS)"), "mic": _Queue("jitter/blur decision (MIC)")}
        self.jitter = _Queue("ColorJitter parameter set")
        self.sigma = _Queue("blur sigma")
        self.classes = _Queue("ClassMix class choice")
        self.crop_offsets = _Queue("HRDA crop offset")
        self.findings: List[str] = []

    # -------------------------------------------------------------------- filling
    def add_strong_aug(self, params, where: str, calls_per_image: bool) -> None:
        """One of our :class:`~uda_plugins.data.strong_aug.StrongAugParams` for a release ``strong_transform`` made
        once per image (``calls_per_image``: DACS's ClassMix, dacs.py:400-409) or once for the batch (MIC,
        masking_consistency_module.py:239-250). The release decides jitter and blur with U(0, 1) > 0.2 / 0.5
        (dacs_transforms.py:56, 72); 1.0 / 0.0 stand for our decisions."""
        n = params.brightness.shape[0]
        self.decisions[where].push(1.0 if params.jitter else 0.0)
        self.decisions[where].push(1.0 if params.blur else 0.0)
        order = params.order if params.order.dim() == 2 else params.order.expand(n, 4)
        groups = [[i] for i in range(n)] if calls_per_image else [list(range(n))]
        for group in groups:
            rows = order[group]
            if len(group) == 1 and params.order.dim() == 1 and n > 1:
                self.findings.append(f"{where}: one jitter order for the batch; the release draws one per image (B3)")
            if not bool((rows == rows[0]).all()):
                self.findings.append(f"{where}: jitter orders differ inside one release draw of the batch (B4)")
            if params.jitter:
                index = torch.tensor(group)
                self.jitter.push(
                    {
                        "brightness_factor": params.brightness[index].float(),
                        "contrast_factor": params.contrast[index].float(),
                        "hue_factor": params.hue[index].float(),
                        "saturation_factor": params.saturation[index].float(),
                        "order": rows[0].clone(),
                    }
                )
            sigmas = params.sigma[group]
            if not bool((sigmas == sigmas[0]).all()):
                self.findings.append(f"{where}: blur sigmas differ inside one release draw of the batch (B4)")
            if params.blur:
                self.sigma.push(float(sigmas[0]))
        self.findings = list(dict.fromkeys(self.findings))

    def add_class_draws(self, draws: List[Tuple[int, torch.Tensor]]) -> None:
        for draw in draws:
            self.classes.push(draw)

    def add_crop_boxes(self, boxes: List[Tuple[int, int, int, int]], divisible: int) -> None:
        for y1, _, x1, _ in boxes:
            assert y1 % divisible == 0 and x1 % divisible == 0
            self.crop_offsets.push(y1 // divisible)
            self.crop_offsets.push(x1 // divisible)

    def assert_consumed(self) -> None:
        for queue in (*self.decisions.values(), self.jitter, self.sigma, self.classes, self.crop_offsets):
            assert not queue.items, f"our step drew {len(queue.items)} more {queue.name} than the release"

    # -------------------------------------------------------------------- patching
    @contextlib.contextmanager
    def patched(self, monkeypatch: pytest.MonkeyPatch):
        import kornia
        from kornia.augmentation.augmentation import _range_bound
        from mmseg.models.segmentors import hrda_encoder_decoder
        from mmseg.models.uda import dacs, masking_consistency_module
        from mmseg.models.utils import dacs_transforms

        draws = self

        def generate_parameters(jitter, batch_shape):
            """kornia 0.5.8 ColorJitter (augmentation.py:234-247): our factors, checked against its ranges."""
            params = draws.jitter.pop(f"ColorJitter.generate_parameters({tuple(batch_shape)})")
            assert params["brightness_factor"].shape[0] == batch_shape[0]
            for name, bounds in (
                ("brightness", dict(center=1.0, bounds=(0, 2))),
                ("contrast", dict(center=1.0)),
                ("saturation", dict(center=1.0)),
                ("hue", dict(bounds=(-0.5, 0.5))),
            ):
                low, high = _range_bound(getattr(jitter, name), name, **bounds).tolist()
                factor = params[f"{name}_factor"]
                assert bool(((low <= factor) & (factor <= high)).all()), f"{name} {factor} outside [{low}, {high}]"
            return {k: v.clone() for k, v in params.items()}

        monkeypatch.setattr(dacs, "random", _PythonRandom(self.decisions["dacs"]))
        monkeypatch.setattr(masking_consistency_module, "random", _PythonRandom(self.decisions["mic"]))
        monkeypatch.setattr(dacs_transforms, "np", _NumpyProxy(self))
        monkeypatch.setattr(hrda_encoder_decoder, "np", _NumpyProxy(self))
        monkeypatch.setattr(kornia.augmentation.ColorJitter, "generate_parameters", generate_parameters)
        yield self


# ---------------------------------------------------------------------------------------------- compare
def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error measured against the tensor's own scale."""
    scale = float(b.detach().double().abs().max()) if b.numel() else 0.0
    return max_abs_diff(a, b) / scale if scale > 0 else max_abs_diff(a, b)
