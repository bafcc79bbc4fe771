"""Fine-tuning strategies: how much of the pretrained network is trained, and on what.

One module per strategy, each exposing `STRATEGY` (`components.training.context.Strategy`): how it
trains from a `Context`, what it costs before it runs, how many views of each image it saw and what
to try when the negative-transfer guard fires for it. A new strategy is a new module here, one entry
below, its name in `FinetuneConfig.strategy` and, if it has settings, a params block beside the others
in `components/training/config.py`.
"""

from components.training.context import Strategy
from components.training.strategies import full, linear, partial, prototypes

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (linear.STRATEGY, partial.STRATEGY, full.STRATEGY,
                                                        prototypes.STRATEGY)}
AUTO_ORDER = ("linear", "partial", "full")  # cheapest first
