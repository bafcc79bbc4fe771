"""A pretrained EfficientNet-style network cut into the parts fine-tuning needs.

timm's EfficientNet family (and MobileNet-V2/V3) share one layout: `conv_stem`, `bn1`, `blocks`
(stages of blocks), `conv_head`, `bn2`, `global_pool`. `frozen_part` and `TrainedTail` split it
after all but the last N blocks; `layer_groups` lists its parameters from the stem to the top for
discriminative learning rates.
"""

from __future__ import annotations

import torch
from torch import nn

from components.core.errors import UserError

LAYOUT = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool")


def check_layout(model: nn.Module, backbone: str, strategy: str) -> None:
    missing = [name for name in LAYOUT if not hasattr(model, name)]
    if missing:
        raise UserError(f"finetune.strategy={strategy}: backbone {backbone!r} lacks {missing} of the EfficientNet "
                        f"layout this strategy cuts; use finetune.strategy=linear for it.")


def flat_blocks(model: nn.Module) -> list[nn.Module]:
    return [block for stage in model.blocks for block in stage]


def n_blocks(model: nn.Module) -> int:
    return len(flat_blocks(model))


class FrozenPart(nn.Module):
    """Image -> activation after all but the last `trainable` blocks."""

    def __init__(self, model: nn.Module, trainable: int):
        super().__init__()
        blocks = flat_blocks(model)
        if not 1 <= trainable <= len(blocks):
            raise UserError(f"finetune.partial.blocks={trainable}: this backbone has {len(blocks)} blocks; "
                            f"use 1 to {len(blocks)}.")
        self.stem = nn.Sequential(model.conv_stem, model.bn1)
        self.blocks = nn.Sequential(*blocks[: len(blocks) - trainable])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(images))


class TrainedTail(nn.Module):
    """Activation -> logits through the last `trainable` blocks, the top conv, pooling and a new head.

    Its modules are the model's own, so training it trains the model in place.
    """

    def __init__(self, model: nn.Module, trainable: int, head: nn.Module, dropout: float):
        super().__init__()
        self.blocks = nn.Sequential(*flat_blocks(model)[-trainable:])
        self.top = nn.Sequential(model.conv_head, model.bn2, model.global_pool)
        self.dropout = nn.Dropout(dropout)
        self.head = head

    def features(self, activation: torch.Tensor) -> torch.Tensor:
        """The pooled features the head reads (and domain adaptation aligns)."""
        return self.top(self.blocks(activation)).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(activation))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Each unfrozen block, the top, the head: earliest first."""
        groups = [list(block.parameters()) for block in self.blocks]
        return groups + [list(self.top.parameters()), list(self.head.parameters())]


class FullModel(nn.Module):
    """Image -> logits through the whole network and a new head, for end-to-end fine-tuning."""

    def __init__(self, model: nn.Module, head: nn.Module, dropout: float):
        super().__init__()
        self.model = model
        self.dropout = nn.Dropout(dropout)
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.blocks(model.bn1(model.conv_stem(images)))
        return self.head(self.dropout(model.global_pool(model.bn2(model.conv_head(x))).flatten(1)))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The stem, each stage, the top, the head: earliest first."""
        model = self.model
        groups = [list(model.conv_stem.parameters()) + list(model.bn1.parameters())]
        groups += [list(stage.parameters()) for stage in model.blocks]
        return groups + [list(model.conv_head.parameters()) + list(model.bn2.parameters()), list(self.head.parameters())]
