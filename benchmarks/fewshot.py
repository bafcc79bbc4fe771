"""Few-shot accuracy against shots: ELPV four-class and scikit-learn's handwritten digits, prototypes vs linear probe.

Each dataset is ingested with the pipeline's own ingest (ELPV from its wheel; the digits written first
as an ImageFolder), its Lite0 features cached by the features stage's code, and `tlops fewshot`'s
episodes run on them (`components.evaluation.fewshot`): N-way over all classes, K support images per
class drawn from train, the whole test split scored, mean accuracy with a 95% interval per K.

The digits: `sklearn.datasets.load_digits`, 1,797 8x8 grayscale scans of handwritten digits (UCI
optdigits, 10 classes), bundled with scikit-learn, which tlops already installs: offline, no new
dependency, and a domain far from both ImageNet and ELPV (ten classes of tiny line drawings). Each
image is written as a 64x64 PNG (nearest-neighbour upscaling keeps its 8x8 pixels exact; validation
wants at least 32 px a side), and preprocessing resizes it to Lite0's 224 px as it would any image.

Work folders go under benchmarks/results/fewshot/ (ignored by git).

    python -m benchmarks.fewshot [--datasets elpv4 digits] [--shots 1 5 10 20] [--episodes 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.feature_extraction import cpu_description
from components.data.config import IngestConfig
from components.data.ingest import run as ingest_run
from components.data.manifest import read_manifest
from components.evaluation import fewshot
from components.evaluation.config import FewshotConfig
from components.features import extract
from components.features.config import FeaturesConfig
from tlops.cli import configure_logging

RESULTS = Path(__file__).parent / "results" / "fewshot"
BACKBONE = "efficientnet_lite0"


def write_digits(root: Path) -> Path:
    """scikit-learn's digits as root/<digit>/<index>.png, 64x64, 8-bit grayscale (0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((64, 64), Image.Resampling.NEAREST).save(folder / f"{index:04d}.png")
    return root


def prepare(name: str, work: Path):  # noqa: ANN201 - the dataset and its features folder
    data = work / name
    if not (data / "manifest.csv").exists():
        if name == "elpv4":
            ingest_run(IngestConfig(label_mode="four_class"), data)
        else:
            source = work / "digits-imagefolder"
            if not source.exists():
                write_digits(source)
            ingest_run(IngestConfig(source="imagefolder", path=str(source)), data)
    dataset = read_manifest(data / "manifest.csv")
    features = work / f"features-{name}"
    if not (features / BACKBONE / "features.npz").exists():
        extract.run(FeaturesConfig(taps=("pooled",)), (BACKBONE,), dataset, work / "cache", features)
    return dataset, features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["elpv4", "digits"], choices=["elpv4", "digits"])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5, 10, 20])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configure_logging()
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {"cpu": cpu_description(), "episodes": args.episodes, "seed": args.seed, "datasets": {}}
    lines = ["| dataset | N-way | test images | K | prototypes | linear probe |", "|---|---|---|---|---|---|"]
    for name in args.datasets:
        dataset, features = prepare(name, RESULTS)
        cfg = FewshotConfig(shots=tuple(args.shots), episodes=args.episodes, seed=args.seed)
        result = fewshot.run(cfg, BACKBONE, dataset, features, RESULTS / f"out-{name}")
        report = json.loads((RESULTS / f"out-{name}" / fewshot.REPORT_FILE).read_text())
        summary["datasets"][name] = {"report": report, **result.info}
        for k, row in sorted(report.items(), key=lambda item: int(item[0])):
            lines.append(f"| {name} | {result.info['n_way']} | {result.info['n_test']} | {k} "
                         f"| {row['prototypes']['mean']:.3f} ± {row['prototypes']['ci95']:.3f} "
                         f"| {row['linear']['mean']:.3f} ± {row['linear']['ci95']:.3f} |")
    (RESULTS / "fewshot.json").write_text(json.dumps(summary, indent=2))
    (RESULTS / "fewshot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
