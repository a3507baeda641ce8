"""MODEL.TIMM.ARCH mit_b0..mit_b5 is SegFormer's MiT-B0..B5 as released, and timm's pvt_v2_b0..b4 are not.

The release is lhoyer/MIC seg/mmseg/models/backbones/mix_transformer.py (from NVlabs/SegFormer; the file DAFormer,
HRDA and MIC train with). Its hyper-parameters per size (the classes mit_b0..mit_b5, :457-550) and its modules' tensor
names and shapes (:22-185, :189-320, :442-446) are transcribed below, independently of the library's table, and
compared with the encoders the library builds: names, shapes, MLP widths, parameter counts, norm eps and stochastic
depth. A checkpoint in the release's names (SegFormer's mit_b*.pth, or an mmseg segmentor's backbone.*) loads through
the real loading path with every tensor in its place; timm's pvt_v2_b0 refuses it.

Optional (skipped without the release): with an lhoyer/MIC checkout (UDA_MMSEG_RELEASE = its seg folder) and mmcv
1.x (importable, or in UDA_MMCV_SITE, a pip --target folder), the authors' own mit_b0..mit_b5 are built: their state
dicts load into ours tensor for tensor, and mit_b0's four outputs match ours on the same weights.
"""

import contextlib
import importlib
import importlib.util
import os
import re
import sys
import types

import pytest
import torch

from uda_plugins.config import get_uda_cfg
from uda_plugins.d2 import BACKBONE_REGISTRY, ShapeSpec

# mix_transformer.py:457-550: embed_dims, num_heads, mlp_ratios, qkv_bias=True, LayerNorm eps 1e-6, depths,
# sr_ratios, per class. (patch_size=4 there is unused: the first patch embedding is always 7x7 / 4, :227-232.)
RELEASE = {
    "mit_b0": dict(dims=(32, 64, 160, 256), heads=(1, 2, 5, 8), mlp=(4, 4, 4, 4), depths=(2, 2, 2, 2)),
    "mit_b1": dict(dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), mlp=(4, 4, 4, 4), depths=(2, 2, 2, 2)),
    "mit_b2": dict(dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), mlp=(4, 4, 4, 4), depths=(3, 4, 6, 3)),
    "mit_b3": dict(dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), mlp=(4, 4, 4, 4), depths=(3, 4, 18, 3)),
    "mit_b4": dict(dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), mlp=(4, 4, 4, 4), depths=(3, 8, 27, 3)),
    "mit_b5": dict(dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), mlp=(4, 4, 4, 4), depths=(3, 6, 40, 3)),
}
SR_RATIOS = (8, 4, 2, 1)  # every size, :469, :485, ...

# Measured with the authors' classes (mmcv 1.7.2, lhoyer/MIC 2f932a9) and timm 1.0.31's pvt_v2_bN (num_classes=0):
# the encoders' parameter counts. They also follow from RELEASE (test_release_shapes_give_the_measured_counts).
MIT_PARAMETERS = {
    "mit_b0": 3_319_392,
    "mit_b1": 13_151_424,
    "mit_b2": 24_196_288,
    "mit_b3": 44_072_128,
    "mit_b4": 60_842_688,
    "mit_b5": 81_443_008,
}
PVT_V2_PARAMETERS = {
    "pvt_v2_b0": 3_409_760,
    "pvt_v2_b1": 13_496_000,
    "pvt_v2_b2": 24_849_856,
    "pvt_v2_b3": 44_725_696,
    "pvt_v2_b4": 62_043_072,
    "pvt_v2_b5": 81_443_008,
}


def release_shapes(arch: str) -> dict:
    """The release's state-dict names and shapes for ``arch``: OverlapPatchEmbed (:171-177: 7x7/4 then 3x3/2 convs,
    a LayerNorm), Block (:125-144) = norm1, Attention (:68-78: q, kv with qkv_bias, proj, and sr + norm where
    sr_ratio > 1), norm2, Mlp (:33-36: fc1, DWConv's depthwise 3x3 ``dwconv.dwconv`` :446, fc2; hidden width
    int(dim * mlp_ratio) :139); a LayerNorm norm<i> after each stage (:272-320). No classifier (:322-324)."""
    spec, out = RELEASE[arch], {}
    for i in range(4):
        d, prev, k = spec["dims"][i], (3 if i == 0 else spec["dims"][i - 1]), (7 if i == 0 else 3)
        hidden, sr = int(d * spec["mlp"][i]), SR_RATIOS[i]
        out.update({f"patch_embed{i + 1}.proj.weight": (d, prev, k, k), f"patch_embed{i + 1}.proj.bias": (d,)})
        out.update({f"patch_embed{i + 1}.norm.weight": (d,), f"patch_embed{i + 1}.norm.bias": (d,)})
        for j in range(spec["depths"][i]):
            b = f"block{i + 1}.{j}"
            block = {
                "norm1.weight": (d,),
                "norm1.bias": (d,),
                "attn.q.weight": (d, d),
                "attn.q.bias": (d,),
                "attn.kv.weight": (2 * d, d),
                "attn.kv.bias": (2 * d,),
                "attn.proj.weight": (d, d),
                "attn.proj.bias": (d,),
                "norm2.weight": (d,),
                "norm2.bias": (d,),
                "mlp.fc1.weight": (hidden, d),
                "mlp.fc1.bias": (hidden,),
                "mlp.dwconv.dwconv.weight": (hidden, 1, 3, 3),
                "mlp.dwconv.dwconv.bias": (hidden,),
                "mlp.fc2.weight": (d, hidden),
                "mlp.fc2.bias": (d,),
            }
            if sr > 1:
                block.update({"attn.sr.weight": (d, d, sr, sr), "attn.sr.bias": (d,)})
                block.update({"attn.norm.weight": (d,), "attn.norm.bias": (d,)})
            out.update({f"{b}.{name}": shape for name, shape in block.items()})
        out.update({f"norm{i + 1}.weight": (d,), f"norm{i + 1}.bias": (d,)})
    return out


def to_timm_name(key: str) -> str:
    """A release name -> timm's PyramidVisionTransformerV2 name, written out here rather than taken from timm's
    checkpoint_filter_fn (which the loader uses) so that a wrong rename there would show."""
    key = re.sub(r"^patch_embed1\.", "patch_embed.", key)
    key = re.sub(r"^patch_embed(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.", key)
    key = re.sub(r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.", key)
    key = re.sub(r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm.", key)
    return key.replace(".mlp.dwconv.dwconv.", ".mlp.dwconv.")


def _cfg(arch: str, pretrained: str = "", drop_path: float = 0.0):
    cfg = get_uda_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_mit_backbone"
    cfg.MODEL.BACKBONE.PRETRAINED = pretrained
    cfg.MODEL.TIMM.ARCH = arch
    cfg.MODEL.TIMM.DROP_PATH_RATE = drop_path
    return cfg


def build(arch: str, pretrained: str = "", drop_path: float = 0.0, meta: bool = False) -> torch.nn.Module:
    """The encoder the library builds for ``MODEL.TIMM.ARCH arch`` (the registered builder, as a config runs it);
    ``meta``: without memory or initialisation, for names and shapes only."""
    with torch.device("meta") if meta else contextlib.nullcontext():
        return BACKBONE_REGISTRY.get("build_mit_backbone")(_cfg(arch, pretrained, drop_path), ShapeSpec(channels=3))


def _shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch", list(RELEASE))
def test_mit_has_the_release_names_and_shapes(arch):
    expected = {to_timm_name(k): s for k, s in release_shapes(arch).items()}
    ours = _shapes(build(arch, meta=True).model)
    assert set(ours) == set(expected), (sorted(set(ours) - set(expected))[:5], sorted(set(expected) - set(ours))[:5])
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}


@pytest.mark.parametrize("arch", list(RELEASE))
def test_mlp_widths_and_parameter_counts(arch):
    model = build(arch, meta=True).model
    widths = [stage.blocks[0].mlp.fc1.out_features for stage in model.stages]
    assert widths == [4 * d for d in RELEASE[arch]["dims"]]  # mlp_ratio 4, :139
    assert sum(p.numel() for p in model.parameters()) == MIT_PARAMETERS[arch]
    timm_name = arch.replace("mit_", "pvt_v2_")
    pvt = build(timm_name, meta=True).model
    pvt_widths = [stage.blocks[0].mlp.fc1.out_features for stage in pvt.stages]
    assert sum(p.numel() for p in pvt.parameters()) == PVT_V2_PARAMETERS[timm_name]
    if arch == "mit_b5":  # the one size where timm's PVTv2 is MiT: the same tensors
        assert _shapes(pvt) == _shapes(model)
    else:  # timm's MLP ratios (8, 8, 4, 4): twice MiT's width in the first two stages
        assert pvt_widths == [8 * d for d in RELEASE[arch]["dims"][:2]] + widths[2:]
        assert _shapes(pvt) != _shapes(model)


def test_mit_b0_widths_and_the_audit_counts():
    """The numbers of the release audit (row C8), written out."""
    assert [4 * d for d in RELEASE["mit_b0"]["dims"]] == [128, 256, 640, 1024]
    assert round(MIT_PARAMETERS["mit_b0"] / 1e6, 2) == 3.32 and round(PVT_V2_PARAMETERS["pvt_v2_b0"] / 1e6, 2) == 3.41
    assert round(MIT_PARAMETERS["mit_b4"] / 1e6, 1) == 60.8 and round(PVT_V2_PARAMETERS["pvt_v2_b4"] / 1e6, 1) == 62.0


@pytest.mark.parametrize("arch", list(RELEASE))
def test_release_shapes_give_the_measured_counts(arch):
    """The transcription alone reproduces the counts measured on the authors' classes (so it is complete)."""
    total = 0
    for shape in release_shapes(arch).values():
        total += int(torch.Size(shape).numel())
    assert total == MIT_PARAMETERS[arch]


def test_norm_eps_and_stochastic_depth_of_the_release():
    """Block and stage norms eps 1e-6 (norm_layer=partial(nn.LayerNorm, eps=1e-6), :467), the patch embeddings' and
    the spatial reduction's 1e-5 (nn.LayerNorm(dim), :78, :177); drop-path rates linspace(0, rate, sum(depths)) over
    all blocks (:255-257), with DAFormer's 0.1 (MixVisionTransformer's default, :203)."""
    model = build("mit_b0", drop_path=0.1).model
    norms = {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    for name, eps in norms.items():
        pytorch_default = name == "patch_embed.norm" or name.endswith(("downsample.norm", "attn.norm"))
        assert eps == (1e-5 if pytorch_default else 1e-6), name
    assert len(norms) == 4 + 4 + 2 * 8 + 6  # patch embeddings, stage norms, two per block, sr norms (sr > 1)
    blocks = [b for s in model.stages for b in s.blocks]
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]  # rate 0: an Identity, as in the release
    assert rates == [getattr(b.drop_path2, "drop_prob", 0.0) for b in blocks]  # one DropPath per block there
    assert rates == torch.linspace(0, 0.1, sum(RELEASE["mit_b0"]["depths"])).tolist()  # the same float32 values
    assert all(b.attn.q.bias is not None and b.attn.kv.bias is not None for s in model.stages for b in s.blocks)


def _release_checkpoint(arch: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in release_shapes(arch).items()}


def test_a_segformer_mit_b0_checkpoint_loads_tensor_for_tensor(tmp_path):
    weights = _release_checkpoint("mit_b0", 0)
    # SegFormer's ImageNet files carry the classifier (the release's MixVisionTransformer has it commented out);
    # the loader drops it.
    segformer = dict(weights, **{"head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)})
    path = tmp_path / "mit_b0.pth"
    torch.save(segformer, path)
    mmseg_path = tmp_path / "mmseg_mit_b0.pth"  # an mmseg segmentor checkpoint: {"state_dict": {"backbone.*"}}
    torch.save({"meta": {}, "state_dict": {"backbone." + k: v for k, v in weights.items()}}, mmseg_path)
    for file in (path, mmseg_path):
        own = build("mit_b0", pretrained=str(file)).model.state_dict()
        assert len(own) == len(weights)
        for key, value in weights.items():
            assert torch.equal(own[to_timm_name(key)], value), key
    with pytest.raises(ValueError, match=r"tensors have another shape.*mlp\.fc1\.weight.*mit_b0\.\.mit_b4"):
        build("pvt_v2_b0", pretrained=str(path))


def test_pvt_v2_b5_and_mit_b5_are_the_same_encoder(tmp_path):
    """The shipped configs' encoder: a MiT-B5 checkpoint loads into either name, giving equal outputs."""
    torch.manual_seed(0)
    source = build("mit_b5")
    path = tmp_path / "mit_b5.pth"
    torch.save(source.model.state_dict(), path)
    other = build("pvt_v2_b5", pretrained=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = source.eval()(x), other(x)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same modules, same weights, same kernels: bit for bit


def test_an_unknown_arch_fails():
    with pytest.raises(ValueError, match="mit_b0..mit_b5 or a timm pvt_v2 arch"):
        build("mit_b6", meta=True)


# ----- optional: the authors' module itself -----------------------------------------------------------------------


@contextlib.contextmanager
def _import_scaffolding(seg: str, site: str):
    """What MIC's mmseg needs to import on mmcv 1.7.2: its folder first on sys.path (removed afterwards, so that its
    other top-level names shadow nothing), mmcv from ``site`` if given (appended: only what is not installed comes
    from there), mmcv's version reported as MIC's pinned 1.3.7 while importing (mmseg/__init__.py asserts mmcv <=
    1.4.0) and, if kornia is absent, a stub while importing (dacs_transforms.py imports it at module level and uses
    it only in training augmentations)."""
    if site and site not in sys.path:
        sys.path.append(site)
    sys.path.insert(0, seg)
    stub = importlib.util.find_spec("kornia") is None
    if stub:
        sys.modules["kornia"] = types.ModuleType("kornia")
    try:
        import mmcv

        version, mmcv.__version__ = mmcv.__version__, "1.3.7"
        try:
            yield
        finally:
            mmcv.__version__ = version
    finally:
        if stub:
            sys.modules.pop("kornia", None)
        sys.path.remove(seg)


@pytest.fixture(scope="module")
def release_mix_transformer():
    seg = os.environ.get("UDA_MMSEG_RELEASE", "")
    site = os.environ.get("UDA_MMCV_SITE", "")
    if not seg or not os.path.isfile(os.path.join(seg, "mmseg", "models", "backbones", "mix_transformer.py")):
        pytest.skip("set UDA_MMSEG_RELEASE to the seg folder of an lhoyer/MIC checkout")
    try:
        with _import_scaffolding(seg, site):
            module = importlib.import_module("mmseg.models.backbones.mix_transformer")
    except ImportError as e:
        pytest.skip(f"lhoyer/MIC's mmseg does not import ({e}); mmcv 1.x on the path or in UDA_MMCV_SITE")
    if not os.path.realpath(module.__file__).startswith(os.path.realpath(seg)):
        pytest.skip(f"another mmseg was imported ({module.__file__})")
    return module


@pytest.mark.parametrize("arch", list(RELEASE))
def test_the_authors_mit_loads_tensor_for_tensor(arch, release_mix_transformer, tmp_path):
    torch.manual_seed(0)
    authors = getattr(release_mix_transformer, arch)()
    weights = authors.state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == release_shapes(arch)  # the transcription
    assert sum(p.numel() for p in authors.parameters()) == MIT_PARAMETERS[arch]
    torch.save(weights, tmp_path / f"{arch}.pth")
    own = build(arch, pretrained=str(tmp_path / f"{arch}.pth"), meta=False).model.state_dict()
    assert len(own) == len(weights) and all(torch.equal(own[to_timm_name(k)], v) for k, v in weights.items())


def _perturb_vectors(model: torch.nn.Module) -> None:
    """Norm weights and all biases away from their 1 / 0 initialisation, so a swapped norm or bias shows; matrices
    keep PyTorch's scaled initialisation (unit-variance ones would saturate the softmax)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                centre = 1.0 if name.endswith(".weight") else 0.0  # the vector weights are all LayerNorm's
                p.copy_(centre + 0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("fused", [False, True])
def test_the_authors_mit_b0_computes_the_same_features(fused, release_mix_transformer, tmp_path):
    """Same weights, same input (not square, so height and width cannot be swapped unnoticed), eval mode: the four
    stage outputs. Either attention path of timm (unfused: the release's explicit (q @ k^T) * scale -> softmax -> @ v,
    :99-103; fused: scaled_dot_product_attention) differs from the release by float32 rounding only: measured at most
    2.3e-6 on features up to 4.5 in magnitude (from the first stage on, where timm normalises a permuted, not a
    contiguous, tensor). The bound 1e-5 leaves room for other CPUs' kernels; a semantic difference is larger: the block
    norms' eps at 1e-5 instead of the release's 1e-6 alone moves the outputs by 2e-5."""
    torch.manual_seed(0)
    authors = release_mix_transformer.mit_b0().eval()
    _perturb_vectors(authors)
    torch.save(authors.state_dict(), tmp_path / "mit_b0.pth")
    ours = build("mit_b0", pretrained=str(tmp_path / "mit_b0.pth")).eval()
    for stage in ours.model.stages:
        for block in stage.blocks:
            block.attn.fused_attn = fused
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        reference = authors(x)
        out = ours(x)
    for name, ref in zip(("res2", "res3", "res4", "res5"), reference):
        torch.testing.assert_close(out[name], ref, rtol=0, atol=1e-5, msg=name)
