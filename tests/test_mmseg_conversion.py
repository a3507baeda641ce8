"""Published mmseg checkpoints (DAFormer / HRDA / MIC) -> this project: a synthetic checkpoint with the reference key
names and shapes (lhoyer/MIC seg/mmseg/models: mix_transformer, daformer_head, hrda_head, dlv2_head, uda/dacs) fills
every parameter; a trained model written out in the reference naming and converted back evaluates identically."""

import json
import os
import re
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides

sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_mmseg_checkpoint as convert_tool  # noqa: E402
import train_net  # noqa: E402

from uda_plugins.config import get_uda_cfg  # noqa: E402
from uda_plugins.d2 import build_model  # noqa: E402
from uda_plugins.modeling.mmseg_conversion import convert_mmseg_checkpoint  # noqa: E402

# mix_transformer.py:457-470 (class mit_b0): MLP ratio 4 in every stage (timm's pvt_v2_b0 has 8, 8, 4, 4).
MIT_B0 = dict(dims=[32, 64, 160, 256], depths=[2, 2, 2, 2], sr=[8, 4, 2, 1], mlp=[4, 4, 4, 4])


def _bn(prefix, c):
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def _mit_keys():
    """SegFormer's original MiT names (mix_transformer.py) and shapes."""
    keys, dims = {}, MIT_B0["dims"]
    for i in range(4):
        d, prev = dims[i], (3 if i == 0 else dims[i - 1])
        k = 7 if i == 0 else 3
        keys.update(
            {
                f"patch_embed{i + 1}.proj.weight": (d, prev, k, k),
                f"patch_embed{i + 1}.proj.bias": (d,),
                f"patch_embed{i + 1}.norm.weight": (d,),
                f"patch_embed{i + 1}.norm.bias": (d,),
            }
        )
        hidden, sr = d * MIT_B0["mlp"][i], MIT_B0["sr"][i]
        for j in range(MIT_B0["depths"][i]):
            b = f"block{i + 1}.{j}"
            for name, shape in [("norm1", (d,)), ("norm2", (d,))]:
                keys.update({f"{b}.{name}.weight": shape, f"{b}.{name}.bias": shape})
            keys.update(
                {
                    f"{b}.attn.q.weight": (d, d),
                    f"{b}.attn.q.bias": (d,),
                    f"{b}.attn.kv.weight": (2 * d, d),
                    f"{b}.attn.kv.bias": (2 * d,),
                    f"{b}.attn.proj.weight": (d, d),
                    f"{b}.attn.proj.bias": (d,),
                }
            )
            if sr > 1:
                keys.update(
                    {
                        f"{b}.attn.sr.weight": (d, d, sr, sr),
                        f"{b}.attn.sr.bias": (d,),
                        f"{b}.attn.norm.weight": (d,),
                        f"{b}.attn.norm.bias": (d,),
                    }
                )
            keys.update(
                {
                    f"{b}.mlp.fc1.weight": (hidden, d),
                    f"{b}.mlp.fc1.bias": (hidden,),
                    f"{b}.mlp.dwconv.dwconv.weight": (hidden, 1, 3, 3),
                    f"{b}.mlp.dwconv.dwconv.bias": (hidden,),
                    f"{b}.mlp.fc2.weight": (d, hidden),
                    f"{b}.mlp.fc2.bias": (d,),
                }
            )
        keys.update({f"norm{i + 1}.weight": (d,), f"norm{i + 1}.bias": (d,)})
    return keys


def _daformer_head_keys(prefix, in_dims, embed, classes, attention=False):
    """mmseg DAFormerHead names: MLP embeddings, ASPPWrapper with depthwise-separable branches (sep_aspp_head), or
    HRDA's attention head whose fusion is a 1x1 ConvModule."""
    keys = {}
    for i, c in enumerate(in_dims):
        keys.update(
            {f"{prefix}.embed_layers.{i}.proj.weight": (embed, c), f"{prefix}.embed_layers.{i}.proj.bias": (embed,)}
        )
    cat = embed * len(in_dims)
    if attention:
        keys[f"{prefix}.fuse_layer.conv.weight"] = (embed, cat, 1, 1)
        keys.update(_bn(f"{prefix}.fuse_layer.bn", embed))
    else:
        keys[f"{prefix}.fuse_layer.aspp_modules.0.conv.weight"] = (embed, cat, 1, 1)
        keys.update(_bn(f"{prefix}.fuse_layer.aspp_modules.0.bn", embed))
        for k in (1, 2, 3):
            m = f"{prefix}.fuse_layer.aspp_modules.{k}"
            keys[f"{m}.depthwise_conv.conv.weight"] = (cat, 1, 3, 3)
            keys.update(_bn(f"{m}.depthwise_conv.bn", cat))
            keys[f"{m}.pointwise_conv.conv.weight"] = (embed, cat, 1, 1)
            keys.update(_bn(f"{m}.pointwise_conv.bn", embed))
        keys[f"{prefix}.fuse_layer.bottleneck.conv.weight"] = (embed, cat, 3, 3)
        keys.update(_bn(f"{prefix}.fuse_layer.bottleneck.bn", embed))
    keys.update({f"{prefix}.conv_seg.weight": (classes, embed, 1, 1), f"{prefix}.conv_seg.bias": (classes,)})
    return keys


def _tensors(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(0, 100, ()) if s == () else torch.randn(s, generator=g)) for k, s in shapes.items()}


def test_a_mic_hrda_mitb5_style_checkpoint_fills_every_parameter():
    cfg = get_uda_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "gta5_cityscapes", "mic_hrda_mitb5.yaml"))
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.BACKBONE.PRETRAINED",
            "",
            "MODEL.TIMM.ARCH",
            "mit_b0",
            "MODEL.SEM_SEG_HEAD.EMBED_DIM",
            "32",
            "MODEL.HRDA.ATTENTION_EMBED_DIM",
            "16",
        ]
    )
    model = build_model(cfg)
    segmentor = dict(_mit_keys())
    segmentor = {"backbone." + k: v for k, v in segmentor.items()}
    segmentor.update(_daformer_head_keys("decode_head.head", MIT_B0["dims"], 32, 19))
    segmentor.update(_daformer_head_keys("decode_head.scale_attention", MIT_B0["dims"], 16, 19, attention=True))
    checkpoint = {"meta": {"CLASSES": []}, "state_dict": {}}
    for prefix, seed in (("model.", 0), ("ema_model.", 1), ("imnet_model.", 2)):
        checkpoint["state_dict"].update({prefix + k: v for k, v in _tensors(segmentor, seed).items()})
    state, unused = convert_mmseg_checkpoint(checkpoint, model)
    own = model.state_dict()
    assert set(own) - set(state) == {"ema_updates"}
    assert all(k.startswith("imnet_model.decode_head.") for k in unused) and unused  # the ImageNet model's head
    source = checkpoint["state_dict"]
    torch.testing.assert_close(
        state["student.head.embed.res3.weight"][:, :, 0, 0], source["model.decode_head.head.embed_layers.1.proj.weight"]
    )
    assert torch.equal(state["teacher.head.classifier.bias"], source["ema_model.decode_head.head.conv_seg.bias"])
    assert torch.equal(
        state["student.head.fuse.branches.2.1.1.running_var"],
        source["model.decode_head.head.fuse_layer.aspp_modules.2.pointwise_conv.bn.running_var"],
    )
    assert torch.equal(
        state["student.scale_attention_head.fuse.0.weight"],
        source["model.decode_head.scale_attention.fuse_layer.conv.weight"],
    )
    assert torch.equal(
        state["feature_distance.encoder.model.stages.3.blocks.1.attn.kv.weight"],
        source["imnet_model.backbone.block4.1.attn.kv.weight"],
    )
    model.load_state_dict(state, strict=False)

    wrong = dict(checkpoint["state_dict"])
    wrong["model.decode_head.head.conv_seg.weight"] = torch.zeros(7, 32, 1, 1)  # a 7-class checkpoint
    with pytest.raises(ValueError, match="student.head.classifier.weight"):
        convert_mmseg_checkpoint(wrong, model)


def _to_reference_names(ours):
    """This project's student weights written out the way an mmseg DAFormerHead / ResNetV1c segmentor names them
    (the inverse of the conversion, written independently from the reference's module names)."""
    out = {}
    for k, v in ours.items():
        if not k.startswith("student."):
            continue
        k = k[len("student.") :]
        if k.startswith("backbone.model."):
            k = k[len("backbone.model.") :]
            k = re.sub(r"^conv1\.(\d+)\.", r"stem.\1.", k)
            k = re.sub(r"^bn1\.", "stem.7.", k)
            out["backbone." + k] = v
            continue
        rules = [
            (r"^head\.embed\.res(\d)\.(weight|bias)$", lambda m: f"embed_layers.{int(m[1]) - 2}.proj.{m[2]}"),
            (r"^head\.fuse\.branches\.0\.0\.(.+)$", lambda m: f"fuse_layer.aspp_modules.0.conv.{m[1]}"),
            (r"^head\.fuse\.branches\.0\.1\.(.+)$", lambda m: f"fuse_layer.aspp_modules.0.bn.{m[1]}"),
            (
                r"^head\.fuse\.branches\.(\d)\.0\.0\.(.+)$",
                lambda m: f"fuse_layer.aspp_modules.{m[1]}.depthwise_conv.conv.{m[2]}",
            ),
            (
                r"^head\.fuse\.branches\.(\d)\.0\.1\.(.+)$",
                lambda m: f"fuse_layer.aspp_modules.{m[1]}.depthwise_conv.bn.{m[2]}",
            ),
            (
                r"^head\.fuse\.branches\.(\d)\.1\.0\.(.+)$",
                lambda m: f"fuse_layer.aspp_modules.{m[1]}.pointwise_conv.conv.{m[2]}",
            ),
            (
                r"^head\.fuse\.branches\.(\d)\.1\.1\.(.+)$",
                lambda m: f"fuse_layer.aspp_modules.{m[1]}.pointwise_conv.bn.{m[2]}",
            ),
            (r"^head\.fuse\.bottleneck\.0\.(.+)$", lambda m: f"fuse_layer.bottleneck.conv.{m[1]}"),
            (r"^head\.fuse\.bottleneck\.1\.(.+)$", lambda m: f"fuse_layer.bottleneck.bn.{m[1]}"),
            (r"^head\.classifier\.(.+)$", lambda m: f"conv_seg.{m[1]}"),
        ]
        for pattern, rename in rules:
            m = re.match(pattern, k)
            if m:
                value = v[:, :, 0, 0] if "embed_layers" in rename(m) and v.dim() == 4 else v
                out["decode_head." + rename(m)] = value
                break
        else:
            raise AssertionError(f"no reference name for {k}")
    return out


def test_a_trained_model_round_trips_through_the_reference_names(tmp_path):
    config = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")
    trained = str(tmp_path / "trained")
    assert train_net.cli(["--config-file", config] + tiny_overrides(trained, **{"TEST.EVAL_PERIOD": 0})) == 0
    ours = torch.load(os.path.join(trained, "model_final.pth"), weights_only=True)["model"]
    reference = str(tmp_path / "mmseg.pth")
    torch.save(
        {"meta": {"iter": 4}, "state_dict": {"model." + k: v for k, v in _to_reference_names(ours).items()}}, reference
    )
    converted = str(tmp_path / "converted.pth")
    overrides = tiny_overrides(str(tmp_path / "unused"))
    assert convert_tool.main(["--config-file", config, "--input", reference, "--output", converted] + overrides) == 0
    back = torch.load(converted, weights_only=True)["model"]
    assert set(back) == set(ours)
    results = []
    for weights in (os.path.join(trained, "model_final.pth"), converted):
        out = str(tmp_path / f"eval{len(results)}")
        args = ["--config-file", config, "--eval-only"] + tiny_overrides(out, **{"MODEL.WEIGHTS": weights})
        assert train_net.cli(args) == 0
        with open(os.path.join(out, "inference", "synthetic_tiny_target_val", "sem_seg_evaluation.json")) as f:
            results.append(json.load(f)["metrics"])
    assert results[0] == results[1]
    # A config that does not describe the checkpoint's network fails naming the parameters.
    bad = ["MODEL.SEM_SEG_HEAD.NAME", "DeepLabV2Head", "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['res5']"]
    assert (
        convert_tool.main(["--config-file", config, "--input", reference, "--output", converted] + overrides + bad) == 1
    )
