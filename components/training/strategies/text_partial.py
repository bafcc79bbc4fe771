"""The text `partial` strategy: the last N transformer layers, pooling and a new head, trained from cached hidden states.

The text twin of `partial`: the embeddings and the layers below the cut run once per text in ONNX
Runtime and their hidden states are cached by content (`components/training/text_activations.py`),
so every epoch, seed and later run trains the top `finetune.partial.blocks` layers on stored tensors.
A text has one view (`partial.views` and `int8_views` are image settings): its tokens as they are.
With `partial.head_init: probe` the head starts as the linear probe on the cached pooled features (LP-FT):
a random head on MiniLM's unit-length mean vectors, at a learning rate the layers below can take, was still
far from fitted after 4 epochs on BBC News (train loss 0.61 with val accuracy 0.965).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from components.data.tokenization import Tokenization, encode, load_tokenizer, read_texts, token_counts
from components.models.text_encoders import FrozenLayers, TrainedLayers, build_encoder, tokenizer_json
from components.training.context import Context, Strategy
from components.training.cost import REFERENCE, Cost, forward_flops, training_seconds
from components.training.loop import Trained, class_weight_vector, fit, scores
from components.training.strategies.linear import probe_head
from components.training.text_activations import cache_hidden_states, padded

log = logging.getLogger(__name__)


def train(ctx: Context) -> Trained:
    began = time.perf_counter()
    cfg, common, entry, dataset, placement = ctx.cfg.partial, ctx.cfg, ctx.entry, ctx.dataset, ctx.placement
    resume_path, fingerprint = ctx.resume("partial", cfg)
    hidden = cache_hidden_states(entry, ctx.preprocessing, cfg.blocks, dataset, ctx.cache_dir, ctx.opset, ctx.atol,
                                 progress=ctx.progress)
    cached_seconds = time.perf_counter() - began
    labels = {split: torch.as_tensor(dataset.label_index(dataset.split(split))) for split in ("train", "val")}
    n_classes = len(dataset.labels)
    torch.manual_seed(common.seed)
    encoder = build_encoder(entry)
    head = probe_head(ctx) if cfg.head_init == "probe" else nn.Linear(entry.feature_dim, n_classes)
    tail = TrainedLayers(encoder, entry, cfg.blocks, head, cfg.dropout)
    for parameter in tail.parameters():
        parameter.requires_grad_(True)
    n_train = len(hidden["train"])

    def batches(epoch: int, generator: torch.Generator) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        for index in torch.randperm(n_train, generator=generator).split(cfg.batch_size):
            yield padded([hidden["train"][i] for i in index.tolist()]), labels["train"][index]

    def evaluate(network: nn.Module) -> dict[str, float]:
        val = hidden["val"]
        logits = torch.cat([network(*(t.to(placement.device) for t in padded(val[i : i + 64])))
                            for i in range(0, len(val), 64)])
        return scores(logits.float().cpu(), labels["val"])

    weight = class_weight_vector(labels["train"].tolist(), n_classes, common.class_weights).to(placement.device)
    loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=common.label_smoothing)
    steps = (n_train + cfg.batch_size - 1) // cfg.batch_size
    result = fit(tail, tail.layer_groups(), batches, steps, evaluate, loss, cfg.loop(common.seed), placement, resume_path,
                 fingerprint, ctx.progress, desc=f"finetune partial ({cfg.blocks} layers)", on_epoch=ctx.on_epoch)
    tail.load_state_dict(result.state)
    tail.cpu().eval()
    info = {"trainable_layers": cfg.blocks, "hidden_state_seconds": cached_seconds,
            "resumed_from_epoch": result.resumed_from, "stopped_early": result.stopped_early}
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    return Trained(encoder, head, result.history, best, time.perf_counter() - began, info)


def mean_tokens(ctx: Context, tokens: Tokenization, sample: int = 64) -> tuple[int, dict[str, np.ndarray]]:
    """Mean tokens per train text (from a sample) and one text of that length, for counting FLOPs."""
    train = ctx.dataset.split("train")
    texts = read_texts([ctx.dataset.image_path(p) for p in train["path"].head(sample)])
    tokenizer = load_tokenizer(tokenizer_json(ctx.entry), tokens)
    length = max(2, round(float(np.mean(token_counts(tokenizer, texts)))))
    example = encode(tokenizer, ["word " * (length * 2)])
    return length, {k: v[:, :length] for k, v in example.items()}


def cost(ctx: Context) -> Cost:
    """The frozen layers once per text, the trained layers forward and backward every epoch (counted, not timed)."""
    cfg, dataset = ctx.cfg.partial, ctx.dataset
    encoder = build_encoder(ctx.entry)
    _, example = mean_tokens(ctx, ctx.preprocessing)
    ids, mask = torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"])
    frozen = FrozenLayers(encoder, ctx.entry, cfg.blocks)
    frozen_flops = forward_flops(_Pair(frozen, mask), ids)
    with torch.no_grad():
        hidden = frozen(ids, mask)
    tail = TrainedLayers(encoder, ctx.entry, cfg.blocks, nn.Linear(ctx.entry.feature_dim, len(dataset.labels)), cfg.dropout)
    n_train, n_val, n_test = (len(dataset.split(split)) for split in ("train", "val", "test"))
    return Cost(inference_s=(n_train + n_val) * frozen_flops / REFERENCE.inference_flops_per_s,
                training_s=training_seconds(forward_flops(_Pair(tail, mask), hidden), cfg.epochs, n_train, n_val))


class _Pair(nn.Module):
    """`module(x, mask)` as a one-input module, for FlopCounterMode's `forward_flops`."""

    def __init__(self, module: nn.Module, mask: torch.Tensor):
        super().__init__()
        self.module, self.mask = module, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x, self.mask)


STRATEGY = Strategy("partial", train, cost, train_views=lambda cfg: 1,
                    next_step="try finetune.strategy=full (auto does this)")
