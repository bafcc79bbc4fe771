"""Fine-tuning strategies: how much of the pretrained network is trained, and on what.

One module per strategy, each exposing `STRATEGY` (`components.training.context.Strategy`): how it
trains from a `Context`, what it costs before it runs, how many views of each image it saw and what
to try when the negative-transfer guard fires for it. A new strategy is a new module here, one entry
below, its name in `FinetuneConfig.strategy` and, if it has settings, a params block beside the others
in `components/training/config.py`.

A modality's own strategies sit beside the image ones under the same names (`text_partial`, `text_full`:
the last transformer layers from cached hidden states, and the whole encoder); `strategies_for` gives
the finetune stage the set for its dataset's modality. `linear` reads cached features of either.
"""

from components.training.context import Strategy
from components.training.strategies import full, linear, partial, prototypes, text_full, text_partial

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (linear.STRATEGY, partial.STRATEGY, full.STRATEGY,
                                                        prototypes.STRATEGY)}
# Prototypes and domain adaptation are image-only: finetune refuses them for a text encoder in one line.
TEXT_STRATEGIES: dict[str, Strategy] = {s.name: s for s in (linear.STRATEGY, text_partial.STRATEGY, text_full.STRATEGY)}
AUTO_ORDER = ("linear", "partial", "full")  # cheapest first


def strategies_for(modality: str) -> dict[str, Strategy]:
    """The strategies, by name, that train an encoder of `modality`."""
    return TEXT_STRATEGIES if modality == "text" else STRATEGIES
