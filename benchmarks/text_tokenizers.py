"""Tokenizer inside the ONNX graph (onnxruntime-extensions) vs the `tokenizers` library tlops serves with.

On every BBC News text (UTF-8 ones; no truncation, so every token is compared): do both give the same
ids, how long does each take per text, and can the in-graph op take a batch? The figures decided how a
text model carries its tokenizer (docs/text.md). Needs the `bench` extra:

    pip install -e '.[bench]'
    python benchmarks/text_tokenizers.py            # writes benchmarks/results/text_tokenizers.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from components.core.cpu import describe_cpu
from components.data.text_ingest import bbcnews_root
from components.models.registry import get_entry
from components.models.text_encoders import TOKENIZER_FILE, weights_dir

OUT = Path(__file__).parent / "results" / "text_tokenizers.json"


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnxruntime as ort
    from onnxruntime_extensions import gen_processing_models, get_library_path
    from tokenizers import Tokenizer
    from transformers import BertTokenizer

    folder = weights_dir(get_entry("all_minilm_l6_v2"))
    texts = []
    for path in sorted(bbcnews_root().glob("*/*.txt")):
        try:
            texts.append(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            continue
    library = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    library.no_truncation()
    library.no_padding()
    graph, _ = gen_processing_models(BertTokenizer.from_pretrained(str(folder)), pre_kwargs={})
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])

    started = time.perf_counter()
    in_graph = [session.run(None, {"text": np.array([text])})[0].ravel().tolist() for text in texts]
    graph_s = time.perf_counter() - started
    started = time.perf_counter()
    one_by_one = [library.encode(text).ids for text in texts]
    library_s = time.perf_counter() - started
    started = time.perf_counter()
    library.encode_batch(texts)
    batch_s = time.perf_counter() - started
    try:
        session.run(None, {"text": np.array(texts[:32])})
        batch_error = None
    except Exception as error:  # noqa: BLE001 - the finding is the error itself
        batch_error = str(error).splitlines()[-1][:200]
    result = {
        "texts": len(texts), "same_ids": sum(a == b for a, b in zip(in_graph, one_by_one)),
        "ms_per_text_in_graph": 1e3 * graph_s / len(texts), "ms_per_text_tokenizers": 1e3 * library_s / len(texts),
        "ms_per_text_tokenizers_batch": 1e3 * batch_s / len(texts), "in_graph_batch_of_32": batch_error or "ok",
        "cpu": describe_cpu(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
