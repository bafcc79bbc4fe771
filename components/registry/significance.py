"""Is the candidate right more often than the champion on the same images? The paired test promote asks.

Both models are scored on the same test images, so what differs is only the discordant pairs (one right, the other
wrong). McNemar's exact test asks whether they split more unevenly than a fair coin would; the paired bootstrap
(`promote.test: bootstrap`) resamples image pairs instead, and is used only where there are enough discordant pairs
for it to be trusted.
"""

from __future__ import annotations

import numpy as np

from components.registry.config import PromoteConfig

# Below this many discordant pairs the exact binomial test decides whatever `promote.test` says. A
# bootstrap resamples so few pairs into a handful of values that its p-value is too small (3-0 on
# 10 images: 0.03 uncentred, 0.047 centred, against the exact 0.125); 25 is the usual bound below
# which McNemar's large-sample approximation is not trusted either. The exact test is never too small.
MIN_DISCORDANT_FOR_BOOTSTRAP = 25


def paired_test(cfg: PromoteConfig, candidate: np.ndarray, champion: np.ndarray) -> dict[str, float | str]:
    """One-sided: is the candidate right more often than the champion on the same images?

    `candidate_only` / `champion_only` count the discordant pairs (one right, the other wrong);
    `statistic` is the accuracy difference; `method` the test that gave `p_value`.
    """
    candidate_only = int((candidate & ~champion).sum())
    champion_only = int((champion & ~candidate).sum())
    discordant = candidate_only + champion_only
    if cfg.test == "bootstrap" and discordant >= MIN_DISCORDANT_FOR_BOOTSTRAP:
        method = "bootstrap"
        p_value = bootstrap_p_value(candidate_only, champion_only, len(candidate), cfg.bootstrap_samples, cfg.seed)
    else:
        from scipy.stats import binomtest

        # Exact McNemar: under no difference each discordant pair favours either model with p = 1/2.
        method = "mcnemar"
        p_value = binomtest(candidate_only, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
    return {"p_value": float(p_value), "statistic": (candidate_only - champion_only) / len(candidate),
            "candidate_only": float(candidate_only), "champion_only": float(champion_only), "method": method}


def bootstrap_p_value(candidate_only: int, champion_only: int, n: int, samples: int, seed: int) -> float:
    """One-sided p-value of the paired bootstrap, drawn from the pair counts alone.

    Resampling n image pairs with replacement only changes how many pairs of each kind there are
    (only the candidate right, only the champion right, both alike), so each resample is one
    multinomial draw of those three counts: memory grows with `samples`, not with n x samples. The
    resampled differences are centred on the observed one (the null hypothesis: no difference), and
    p is the share of them at least as large as the observed difference.
    """
    rng = np.random.default_rng(seed)
    alike = max(0.0, 1.0 - (candidate_only + champion_only) / n)
    counts = rng.multinomial(n, [candidate_only / n, champion_only / n, alike], size=samples)
    observed = candidate_only - champion_only
    centred = counts[:, 0] - counts[:, 1] - observed
    return (1 + int((centred >= observed).sum())) / (samples + 1)
