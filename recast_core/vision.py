"""Small vision backbones (ViT with fused qkv, ResNet-style CNN) and their RecastConfigs.

They show that reparameterization is architecture-agnostic: modules are found by name patterns only.
"""

from __future__ import annotations

import torch
from torch import nn

from recast_core.config import ModuleKind, RecastConfig


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, d_head)
        attn = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d_head)
        out: torch.Tensor = self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return out


class _Mlp(nn.Module):
    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(nn.functional.gelu(self.fc1(x)))
        return out


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class TinyViT(nn.Module):
    """A ViT for 28x28 grey images: 7x7 patches, a class token, `depth` pre-norm blocks, fused qkv."""

    def __init__(
        self, dim: int = 64, depth: int = 4, heads: int = 4, patch: int = 7, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        tokens = (28 // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, 4) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.norm(x)[:, 0]  # (B, dim)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


def vit_config(groups: int = 2, templates: int = 2, coeff_sets: int = 2) -> RecastConfig:
    kinds = (
        ModuleKind("qkv", ("blocks.{layer}.attn.qkv",)),
        ModuleKind("attn_out", ("blocks.{layer}.attn.proj",)),
        ModuleKind("ffn_in", ("blocks.{layer}.mlp.fc1",)),
        ModuleKind("ffn_out", ("blocks.{layer}.mlp.fc2",)),
    )
    return RecastConfig(
        kinds=kinds, groups=groups, templates=templates, coeff_sets=coeff_sets, name="tiny-vit"
    )


class _BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        out: torch.Tensor = torch.relu(x + self.bn2(self.conv2(y)))
        return out


class TinyResNet(nn.Module):
    """A ResNet-style CNN for 28x28 grey images: a strided stem and `depth` basic blocks of equal width."""

    def __init__(self, channels: int = 32, depth: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.ModuleList(_BasicBlock(channels) for _ in range(depth))
        self.head = nn.Linear(channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3))  # (B, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


def resnet_config(groups: int = 2, templates: int = 2, coeff_sets: int = 2) -> RecastConfig:
    kinds = (
        ModuleKind("conv1", ("blocks.{layer}.conv1",)),
        ModuleKind("conv2", ("blocks.{layer}.conv2",)),
    )
    return RecastConfig(
        kinds=kinds, groups=groups, templates=templates, coeff_sets=coeff_sets, name="tiny-resnet"
    )
