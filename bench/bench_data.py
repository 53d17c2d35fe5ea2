"""The dialogs the benchmarks run on: a data file the user names, or synthetic dialogs (`persona_synthetic`)."""

from __future__ import annotations

import json
import os


def bench_dialogs(dataset_path: str | None, workdir: str, num_train: int):
    """The dialogs a benchmark runs on, and their texts (to train its tiny tokenizer on): the train split (else the
    first) of `dataset_path`, any reader format, or `num_train` synthetic dialogs written under `workdir`."""
    from persona_data import load_dialogs
    from persona_synthetic import corpus_texts, make_synthetic_personachat

    if dataset_path is None:
        data = make_synthetic_personachat(num_train=num_train, num_valid=1, seed=0)
        dataset_path = os.path.join(workdir, "data.json")
        with open(dataset_path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    splits = load_dialogs(dataset_path)
    dialogs = splits["train"] if "train" in splits else next(iter(splits.values()))
    return dialogs, list(corpus_texts({"train": dialogs}))
