#!/usr/bin/env python
"""Offline stand-ins for the Hub: a synthetic PERSONA-CHAT corpus, a tiny byte-level BPE tokenizer, a tiny GPT-2.

The corpus is generated from templates (written by this project) so that the persona decides the gold reply:
a model that reads the persona can learn it, which makes the offline demo and the tests meaningful.

    python persona_synthetic.py --output_dir demo_assets   # writes personachat.json and tiny-gpt2/
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from collections.abc import Iterable

ATTRIBUTES = {
    "pet": (
        ["cats", "dogs", "horses", "parrots", "rabbits", "snakes", "turtles", "hamsters"],
        "i have {} at home.",
        "do you have any pets?",
        "yes , i have {} at home .",
    ),
    "job": (
        ["nurse", "teacher", "farmer", "pilot", "baker", "lawyer", "chef", "painter", "plumber", "singer"],
        "i work as a {}.",
        "what do you do for a living?",
        "i am a {} , i love my job .",
    ),
    "color": (
        ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
        "my favorite color is {}.",
        "what is your favorite color?",
        "i like {} the most .",
    ),
    "food": (
        ["pizza", "sushi", "tacos", "pasta", "salad", "burgers", "soup", "curry"],
        "i love to eat {}.",
        "what do you like to eat?",
        "i could eat {} every day .",
    ),
    "hobby": (
        ["hiking", "chess", "painting", "swimming", "reading", "gardening", "dancing", "fishing"],
        "in my free time i enjoy {}.",
        "what do you do for fun?",
        "mostly {} , it relaxes me .",
    ),
    "city": (
        ["paris", "tokyo", "london", "chicago", "berlin", "madrid", "toronto", "sydney"],
        "i live in {}.",
        "where do you live?",
        "i live in {} , it is a great city .",
    ),
}
OPENERS = ["hi , how are you today?", "hello there!", "hey , nice to meet you .", "good evening , how is it going?"]
GREETINGS = ["i am great , thanks for asking .", "hello ! i am doing well .", "hi , nice to meet you too ."]
ACKS = ["that sounds nice .", "oh , cool !", "interesting , tell me more .", "i see , that is great ."]


def make_dialog(rng: random.Random) -> tuple[list[str], list[str], list[int]]:
    """One dialog: persona sentences, the turns (partner first), and the indices of the bot's turns."""
    keys = rng.sample(sorted(ATTRIBUTES), k=4)
    values = {k: rng.choice(ATTRIBUTES[k][0]) for k in keys}
    persona = [ATTRIBUTES[k][1].format(values[k]) for k in keys]
    turns = [rng.choice(OPENERS), rng.choice(GREETINGS)]
    for k in rng.sample(keys, k=3):
        turns += [ATTRIBUTES[k][2], ATTRIBUTES[k][3].format(values[k])]
        turns += [rng.choice(ACKS), rng.choice(GREETINGS)]
    return persona, turns, list(range(1, len(turns), 2))


def make_synthetic_personachat(
    num_train: int = 200, num_valid: int = 40, num_candidates: int = 20, seed: int = 0
) -> dict[str, list[dict]]:
    """A PERSONA-CHAT "self_original" dict; distractors come from other dialogs' bot turns only."""
    rng = random.Random(seed)
    raw = {split: [make_dialog(rng) for _ in range(n)] for split, n in (("train", num_train), ("valid", num_valid))}
    # Distractors: bot turns of any other dialog (of either split), never one of the dialog's own turns.
    replies = sorted(
        {(split, d, turns[i]) for split, ds in raw.items() for d, (_, turns, bot) in enumerate(ds) for i in bot}
    )
    out = {}
    for split, dialogs in raw.items():
        out[split] = []
        for d, (persona, turns, bot) in enumerate(dialogs):
            own = set(turns)
            pool = sorted({r for s, other, r in replies if (s, other) != (split, d) and r not in own})
            utterances = [
                {"history": turns[:i], "candidates": rng.sample(pool, k=num_candidates - 1) + [turns[i]]} for i in bot
            ]
            out[split].append({"personality": persona, "utterances": utterances})
    return out


def corpus_texts(data: dict[str, list[dict]]) -> Iterable[str]:
    for dialogs in data.values():
        for dialog in dialogs:
            yield from dialog["personality"]
            for u in dialog["utterances"]:
                yield from u["history"]
                yield from u["candidates"]


def train_tiny_tokenizer(texts: Iterable[str], output_dir: str, vocab_size: int = 400):
    """Train a byte-level BPE on `texts`, save it in GPT-2 format (vocab.json + merges.txt) and load it back."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"])
    os.makedirs(output_dir, exist_ok=True)
    bpe.save_model(output_dir)
    return GPT2Tokenizer.from_pretrained(output_dir)


def make_tiny_checkpoint(
    output_dir: str,
    texts: Iterable[str],
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 256,
    vocab_size: int = 400,
    seed: int = 0,
) -> str:
    """A randomly initialised GPT-2 double-heads model + tiny tokenizer, saved as a loadable checkpoint."""
    import torch
    from transformers import GPT2Config, GPT2DoubleHeadsModel

    tokenizer = train_tiny_tokenizer(texts, output_dir, vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2DoubleHeadsModel(config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def make_tiny_nli_checkpoint(
    output_dir: str,
    texts: Iterable[str],
    *,
    labels: tuple[str, ...] = ("entailment", "neutral", "contradiction"),
    tokenizer_from: str | None = None,
    vocab_size: int = 300,
    hidden_size: int = 32,
    seed: int = 0,
) -> str:
    """A randomly initialised tiny BERT NLI classifier + WordPiece tokenizer trained on `texts`, saved loadable.

    `labels` names the classifier rows, which are permuted to match: the same seed and vocabulary (`tokenizer_from`,
    a folder whose vocab.txt to reuse; WordPiece training breaks ties differently from run to run) with any order of
    the three NLI labels is the same classifier, giving the same C-scores.
    """
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    os.makedirs(output_dir, exist_ok=True)
    vocab_file = os.path.join(output_dir, "vocab.txt")
    if tokenizer_from is not None:
        shutil.copyfile(os.path.join(tokenizer_from, "vocab.txt"), vocab_file)
    else:
        wordpiece = BertWordPieceTokenizer(lowercase=True)
        wordpiece.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1)
        wordpiece.save_model(output_dir)
    tokenizer = BertTokenizerFast(vocab_file, do_lower_case=True, model_max_length=128)
    canonical = ("entailment", "neutral", "contradiction")
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        num_labels=len(canonical),
        initializer_range=0.5,  # large random weights: the [CLS] state, and so the label, varies with the pair
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.bias.normal_(0.0, 0.5)
        rows = [canonical.index(label.lower()) if label.lower() in canonical else i for i, label in enumerate(labels)]
        model.classifier.weight.copy_(model.classifier.weight[rows])
        model.classifier.bias.copy_(model.classifier.bias[rows])
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def write_demo_assets(output_dir: str, num_train: int = 200, num_valid: int = 40, seed: int = 0) -> dict[str, str]:
    """Write `personachat.json` and a `tiny-gpt2/` checkpoint under `output_dir`; return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    data = make_synthetic_personachat(num_train, num_valid, seed=seed)
    data_path = os.path.join(output_dir, "personachat.json")
    with open(data_path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    model_path = make_tiny_checkpoint(os.path.join(output_dir, "tiny-gpt2"), corpus_texts(data), seed=seed)
    return {"dataset_path": data_path, "model_name_or_path": model_path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_assets")
    parser.add_argument("--num_train", type=int, default=200)
    parser.add_argument("--num_valid", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_demo_assets(args.output_dir, args.num_train, args.num_valid, args.seed)
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
