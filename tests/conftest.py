"""Offline fixtures, each built once per session: synthetic persona dialogs, a tiny tokenizer and GPT-2, the
chat-template families' tokenizers, the multi-process runs' assets. Test modules share plain helpers from helpers.py."""

from __future__ import annotations

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Errors are one line unless PERSONA_DEBUG is set: the tests check the one line, whatever the shell sets.
os.environ.pop("PERSONA_DEBUG", None)

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")

from helpers import INSTRUCT_FAMILIES, backbone_config  # noqa: E402

from persona_synthetic import (  # noqa: E402
    corpus_texts,
    make_synthetic_personachat,
    make_tiny_checkpoint,
    make_tiny_nli_checkpoint,
)


@pytest.fixture(scope="session")
def synthetic_data() -> dict:
    """A small synthetic PERSONA-CHAT dict (20 candidates per turn)."""
    return make_synthetic_personachat(num_train=24, num_valid=8, seed=0)


@pytest.fixture(scope="session")
def personachat_json(tmp_path_factory, synthetic_data) -> str:
    path = tmp_path_factory.mktemp("data") / "personachat.json"
    path.write_text(json.dumps(synthetic_data))
    return str(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, synthetic_data) -> str:
    """A random tiny GPT-2 double-heads checkpoint with a byte-level BPE tokenizer (no special tokens yet)."""
    out = tmp_path_factory.mktemp("tiny-gpt2")
    return make_tiny_checkpoint(str(out), corpus_texts(synthetic_data), n_layer=2, n_embd=32, n_head=2)


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer(tiny_checkpoint):
    """The tiny checkpoint loaded through the project's loader (special tokens added). Do not train it in place."""
    from persona_model import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="session")
def persona_checkpoint(tmp_path_factory, tiny_model_and_tokenizer) -> str:
    """The tiny model saved WITH the persona tokens, so every process loads identical weights."""
    model, tokenizer = tiny_model_and_tokenizer
    out = tmp_path_factory.mktemp("tiny-persona")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture
def tokenizer(tiny_model_and_tokenizer):
    return tiny_model_and_tokenizer[1]


@pytest.fixture(scope="session")
def shared_spc_csv() -> str:
    path = os.path.join(SHARED_DATA, "Synthetic-Persona-Chat_valid.csv")
    if not os.path.exists(path):
        pytest.skip(f"real persona data not present at {path}")
    return path


# Label orders of popular NLI checkpoints: roberta-large-mnli; MoritzLaurer DeBERTa-v3 and ynie RoBERTa;
# cross-encoder/nli-deberta-v3.
NLI_LABEL_ORDERS = {
    "mnli-style": ("CONTRADICTION", "NEUTRAL", "ENTAILMENT"),
    "deberta-style": ("entailment", "neutral", "contradiction"),
    "cross-encoder-style": ("contradiction", "entailment", "neutral"),
}


@pytest.fixture(scope="session")
def tiny_nli_checkpoints(tmp_path_factory, synthetic_data) -> dict[str, str]:
    """One tiny NLI classifier saved three times: same weights and vocabulary, classifier rows in three label orders."""
    root = tmp_path_factory.mktemp("tiny-nli")
    first = make_tiny_nli_checkpoint(str(root / "base"), corpus_texts(synthetic_data))
    return {
        name: make_tiny_nli_checkpoint(str(root / name), (), labels=labels, tokenizer_from=first)
        for name, labels in NLI_LABEL_ORDERS.items()
    }


@pytest.fixture(scope="session")
def dialogs() -> list[dict]:
    """12 synthetic training dialogs (the chat-template tests)."""
    return make_synthetic_personachat(num_train=12, num_valid=2, seed=1)["train"]


@pytest.fixture(scope="session")
def chat_tokenizer_folders(tmp_path_factory, dialogs) -> dict[str, str]:
    """Tiny tokenizers of the chat-template families (chatml, llama3, gemma, llama3-gpt2-pretokenizer), trained once
    on `dialogs` rendered with their templates (helpers.train_chat_tokenizers); their folders by family."""
    from helpers import train_chat_tokenizers

    return train_chat_tokenizers(dialogs, tmp_path_factory.mktemp("chat-tokenizers"))


@pytest.fixture(scope="module")
def tokenizers(chat_tokenizer_folders) -> dict:
    """The chat-template families' tokenizers, loaded afresh for each test module: a test may record an input format
    (a system prompt) on one, which must not reach other modules."""
    from transformers import AutoTokenizer

    return {family: AutoTokenizer.from_pretrained(path) for family, path in chat_tokenizer_folders.items()}


@pytest.fixture(scope="session")
def persona_setup(tmp_path_factory):
    """Dialogs with 20 candidates per turn in every split (synthetic_data's are too few for that) and a tiny checkpoint
    of their own, loaded. Do not train the model in place."""
    from persona_model import load_model_and_tokenizer

    data = make_synthetic_personachat(num_train=16, num_valid=16, seed=0)
    out = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny-gpt2-sp")), corpus_texts(data), n_embd=32, n_head=2)
    model, tokenizer = load_model_and_tokenizer(out)
    return data, model, tokenizer


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """Dialogs and a tiny GPT-2 without dropout, so that runs on different process counts can agree exactly."""
    root = tmp_path_factory.mktemp("scale")
    data = make_synthetic_personachat(num_train=24, num_valid=16, seed=0)
    (root / "personachat.json").write_text(json.dumps(data))
    model_dir = make_tiny_checkpoint(str(root / "tiny"), corpus_texts(data), n_layer=2, n_embd=32, n_head=2)
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    with open(config_path, "w") as f:
        json.dump(config, f)
    return {"model": model_dir, "data": str(root / "personachat.json"), "cache": str(root / "cache")}


@pytest.fixture(scope="module")
def instruct_checkpoints(tmp_path_factory, tokenizers) -> dict[str, str]:
    """Plain instruct-style checkpoints as downloaded from the Hub: random weights, a tokenizer with a chat template."""
    paths = {}
    for seed, (family, tok_family) in enumerate(INSTRUCT_FAMILIES.items()):
        import torch
        from transformers import AutoModelForCausalLM

        tokenizer = tokenizers[tok_family]
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(backbone_config(family, len(tokenizer)))
        path = tmp_path_factory.mktemp(f"instruct-{family}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[family] = str(path)
    return paths
