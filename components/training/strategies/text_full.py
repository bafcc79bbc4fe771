"""The text `full` strategy: the whole encoder and a new head, trained end to end on tokenized texts.

No augmentation: a text is its tokens. Every epoch runs every layer forward and backward, so on
2 CPU cores it is the strategy `auto` can least often afford (`finetune.budget_minutes`). With
`full.head_init: probe` the head starts as the linear probe on the cached pooled features (LP-FT): at a
learning rate a pretrained encoder can take (5e-5), a random head was still at train loss 1.25 of 1.61
after 2 epochs on BBC News.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from components.data.tokenization import encode, load_tokenizer, read_texts
from components.models.text_encoders import build_encoder, embed, pool, run_layers, tap_spec, tokenizer_json
from components.training.context import Context, Strategy
from components.training.cost import Cost, forward_flops, training_seconds
from components.training.loop import Trained, class_weight_vector, fit, scores
from components.training.strategies.linear import probe_head
from components.training.strategies.text_partial import _Pair, mean_tokens

log = logging.getLogger(__name__)


class FullText(nn.Module):
    """(input_ids, attention_mask) -> logits through the entry's layers, its pooling, dropout and a new head."""

    def __init__(self, encoder: nn.Module, pooling: str, layer: int, normalize: bool, head: nn.Module, dropout: float):
        super().__init__()
        self.encoder, self.pooling, self.layer, self.normalize = encoder, pooling, layer, normalize
        self.dropout, self.head = nn.Dropout(dropout), head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = run_layers(self.encoder, embed(self.encoder, input_ids), attention_mask, 1, self.layer)
        return self.head(self.dropout(pool(hidden, attention_mask, self.pooling, self.normalize)))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The embeddings, each layer, the head: earliest first."""
        layers = self.encoder.encoder.layer[: self.layer]
        return ([list(self.encoder.embeddings.parameters())] + [list(layer.parameters()) for layer in layers]
                + [list(self.head.parameters())])


def network(ctx: Context, head: nn.Module, dropout: float) -> tuple[nn.Module, FullText]:
    encoder = build_encoder(ctx.entry)
    pooling, layer = tap_spec(ctx.entry.taps["pooled"])
    return encoder, FullText(encoder, pooling, layer, ctx.entry.normalize, head, dropout)


def train(ctx: Context) -> Trained:
    began = time.perf_counter()
    cfg, common, dataset, placement = ctx.cfg.full, ctx.cfg, ctx.dataset, ctx.placement
    resume_path, fingerprint = ctx.resume("full", cfg)
    tokenizer = load_tokenizer(tokenizer_json(ctx.entry), ctx.preprocessing)
    texts = {s: read_texts([dataset.image_path(p) for p in dataset.split(s)["path"]]) for s in ("train", "val")}
    labels = {s: torch.as_tensor(dataset.label_index(dataset.split(s))) for s in ("train", "val")}
    n_classes = len(dataset.labels)
    torch.manual_seed(common.seed)
    head = probe_head(ctx) if cfg.head_init == "probe" else nn.Linear(ctx.entry.feature_dim, n_classes)
    encoder, model = network(ctx, head, cfg.dropout)
    for parameter in model.parameters():
        parameter.requires_grad_(True)

    def tensors(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feeds = encode(tokenizer, batch)
        return torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])

    def batches(epoch: int, generator: torch.Generator) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        for index in torch.randperm(len(texts["train"]), generator=generator).split(cfg.batch_size):
            yield tensors([texts["train"][i] for i in index.tolist()]), labels["train"][index]

    def evaluate(net: nn.Module) -> dict[str, float]:
        val = texts["val"]
        logits = torch.cat([net(*(t.to(placement.device) for t in tensors(val[i : i + 64]))) for i in range(0, len(val), 64)])
        return scores(logits.float().cpu(), labels["val"])

    loss = nn.CrossEntropyLoss(weight=class_weight_vector(labels["train"].tolist(), n_classes, common.class_weights)
                               .to(placement.device), label_smoothing=common.label_smoothing)
    steps = (len(texts["train"]) + cfg.batch_size - 1) // cfg.batch_size
    result = fit(model, model.layer_groups(), batches, steps, evaluate, loss, cfg.loop(common.seed), placement,
                 resume_path, fingerprint, ctx.progress, desc="finetune full (text)", on_epoch=ctx.on_epoch)
    model.load_state_dict(result.state)
    model.cpu().eval()
    info = {"resumed_from_epoch": result.resumed_from, "stopped_early": result.stopped_early}
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    return Trained(encoder, head, result.history, best, time.perf_counter() - began, info)


def cost(ctx: Context) -> Cost:
    """Every layer forward and backward every epoch, on texts of the train split's mean length."""
    cfg, dataset = ctx.cfg.full, ctx.dataset
    _, model = network(ctx, nn.Linear(ctx.entry.feature_dim, len(dataset.labels)), cfg.dropout)
    _, example = mean_tokens(ctx, ctx.preprocessing)
    flops = forward_flops(_Pair(model, torch.from_numpy(example["attention_mask"])), torch.from_numpy(example["input_ids"]))
    n_train, n_val = len(dataset.split("train")), len(dataset.split("val"))
    return Cost(training_s=training_seconds(flops, cfg.epochs, n_train, n_val))


STRATEGY = Strategy("full", train, cost, train_views=lambda cfg: 1,
                    next_step="the pretrained encoder does not help on this data; consider another encoder or more data")
