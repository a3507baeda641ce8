"""The Guider of Guidance Training (Zhou et al., arXiv 2403.14995): from the encoder features of a mixed image it
drops the positions pasted from the source and reconstructs target features there from the remaining target
context, for the shared decode head to predict the unmixed target image.

Follows ``Wenlve-Zhou/Guidance-Training`` ``seg/mmseg/models/Guider.py`` (``Aggregation``, ``Projector``) on the
guided level ``f`` with the target mask ``m`` (1 = the pixel is still target), resized (nearest) to ``f``:

1. ``a = z1(f * m + (1 - m) * t1)``, ``t1`` a learnable mask token, ``z1`` a zero-initialised 1x1 conv;
2. patch embedding (``p x p`` patches, ``EMBED_DIM``), a fixed 2-D sin-cos position embedding, ``DEPTH`` ViT blocks
   (``NUM_HEADS``, MLP ratio, qkv bias, LayerNorm eps 1e-6);
3. LayerNorm, a linear layer to ``p * p * C`` per token, un-patchify, ``z2`` a zero-initialised 1x1 conv -> offset;
4. ``g = f * m + (1 - m) * t2 + offset`` with a second token ``t2``.

At initialisation both zero convs make the offset 0, so ``g`` is the masked feature map: training starts from the
plain mixed features with the source removed. Initialisation as the reference: truncated-normal (0.02) linear
layers, Kaiming (fan-out) convs, LayerNorm (1, 0), tokens N(0, 0.02).

Generalised where the reference hard-codes its sizes (64x64 features of a 512x512 crop at output stride 8, one
level, square grids): any feature size (padded to whole patches, cropped back), rectangular grids (the position
embedding is computed for the grid at hand, with the reference's layout: the first half of the channels encodes
the column, the second the row), and multi-level decode heads: the guided level (``UDA.GUIDANCE.FEATURE``, the
deepest by default, as the reference) is reconstructed; every other level the head reads is masked the same way
with its own learnable token, so no level lets the head see the pasted source.
"""

from __future__ import annotations

from functools import partial
from typing import Dict

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

__all__ = ["Guider", "sincos_position_embedding"]


def sincos_position_embedding(embed_dim: int, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, embed_dim) fixed 2-D sin-cos embedding, row-major (MAE's ``get_2d_sincos_pos_embed`` for a
    square grid: the first half of the channels encodes the column, the second the row)."""
    if embed_dim % 4:
        raise ValueError(f"The Guider's embedding width must be a multiple of 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(xs), embed(ys)], dim=1).float()


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.weight, 1.0)
        nn.init.constant_(m.bias, 0)


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _token(channels: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(1, channels, 1, 1) * 0.02)


def _mask_like(mask: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    return F.interpolate(mask.float(), size=feature.shape[-2:], mode="nearest").to(feature.dtype)


class Guider(nn.Module):
    def __init__(
        self,
        channels: Dict[str, int],
        guided: str,
        *,
        embed_dim: int = 512,
        depth: int = 2,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
    ) -> None:
        """``channels``: the width of every level the decode head reads; ``guided``: the level to reconstruct."""
        super().__init__()
        if guided not in channels:
            raise ValueError(
                f"UDA.GUIDANCE.FEATURE '{guided}' is not a level the decode head reads: {sorted(channels)}"
            )
        if embed_dim % num_heads:
            raise ValueError(f"UDA.GUIDANCE.EMBED_DIM {embed_dim} must be divisible by NUM_HEADS {num_heads}")
        self.guided, self.patch_size, self.embed_dim = guided, patch_size, embed_dim
        c = channels[guided]
        self.channels = c
        # Aggregation
        self.patch_embed = nn.Conv2d(c, embed_dim, patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(depth)
        )
        # Projector
        self.decoder_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(embed_dim, patch_size * patch_size * c)
        self.apply(_init_weights)
        self.z1, self.z2 = _zero_conv(c), _zero_conv(c)
        self.aggregation_token, self.projector_token = _token(c), _token(c)
        # The other levels: masked with their own token.
        self.level_tokens = nn.ParameterDict({k: _token(ch) for k, ch in channels.items() if k != guided})

    def forward(self, features: Dict[str, torch.Tensor], target_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``features`` of the mixed image and its (N, 1, H, W) ``target_mask`` (1 = target pixel) -> guided
        features with the same keys and shapes."""
        out = dict(features)
        for key, token in self.level_tokens.items():
            m = _mask_like(target_mask, features[key])
            out[key] = features[key] * m + (1 - m) * token
        f = features[self.guided]
        m = _mask_like(target_mask, f)
        out[self.guided] = (
            f * m + (1 - m) * self.projector_token + self.offset(f * m + (1 - m) * self.aggregation_token)
        )
        return out

    def offset(self, masked: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``z2(unpatchify(pred(norm(blocks(embed(z1(masked)) + pos)))))`` at ``masked``'s size."""
        n, c, h, w = masked.shape
        p = self.patch_size
        pad_h, pad_w = (-h) % p, (-w) % p
        x = F.pad(self.z1(masked), (0, pad_w, 0, pad_h))
        rows, cols = (h + pad_h) // p, (w + pad_w) // p
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, rows * cols, D)
        tokens = tokens + sincos_position_embedding(self.embed_dim, rows, cols).to(tokens)
        for block in self.blocks:
            tokens = block(tokens)
        pred = self.decoder_pred(self.decoder_norm(tokens))  # (N, L, p * p * C)
        pred = pred.reshape(n, rows, cols, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, rows * p, cols * p)
        return self.z2(pred[:, :, :h, :w])
