#!/usr/bin/env python
"""Activation memory of one training forward of a double-heads persona model, measured on CPU, per decoder layer.

    python bench/activation_memory.py --family qwen2.5-0.5b --batch 4 --candidates 4 --context 256 --reply 24

The model has the real hidden sizes of the named backbone but 1 and then 2 decoder layers (random weights, bf16
autocast, sdpa attention): the difference of the tensors saved for backward is one layer's activations, the rest
(embeddings, the labelled-position LM logits, the MC head) is the fixed part. Candidates share their context, as
chat-template rows do (system prompt + history + assistant header), so the shared-prefix forward encodes it once.
Saved tensors are counted once per storage (views of one buffer are not double-counted).
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, Qwen2Config

from persona_backbone import PersonaDoubleHeadsConfig, PersonaDoubleHeadsModel

# The published configs' sizes (hidden, layers, heads, kv heads, MLP, vocab, tied embeddings).
FAMILIES = {
    "qwen2.5-0.5b": (Qwen2Config, 896, 24, 14, 2, 4864, 151936, True),
    "smollm2-360m": (LlamaConfig, 960, 32, 15, 5, 2560, 49152, True),
}


def saved_bytes(model, batch) -> int:
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        (out.lm_loss + out.mc_loss).backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen2.5-0.5b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--context", type=int, default=256, help="shared tokens: system + history + header")
    parser.add_argument("--reply", type=int, default=24, help="tokens of each candidate's reply + end of turn")
    parser.add_argument("--shared_prefix", type=int, default=1)
    args = parser.parse_args()
    config_cls, hidden, layers, heads, kv_heads, mlp, vocab, tied = FAMILIES[args.family]
    torch.manual_seed(0)
    seq = args.context + args.reply
    ids = torch.randint(10, vocab, (args.batch, args.candidates, seq))
    ids[:, :, : args.context] = ids[:, :1, : args.context]  # the shared context
    labels = torch.full_like(ids, -100)
    labels[:, -1, args.context :] = ids[:, -1, args.context :]
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "mc_token_ids": torch.full((args.batch, args.candidates), seq - 1),
        "mc_labels": torch.full((args.batch,), args.candidates - 1),
    }
    measured = {}
    for n in (1, 2):
        backbone = config_cls(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=kv_heads, intermediate_size=mlp, tie_word_embeddings=tied, attn_implementation="sdpa",
        )  # fmt: skip
        model = PersonaDoubleHeadsModel(PersonaDoubleHeadsConfig.from_backbone(backbone)).train()
        model.config.persona_shared_prefix = bool(args.shared_prefix)
        measured[n] = saved_bytes(model, batch)
    per_layer = measured[2] - measured[1]
    fixed = measured[1] - per_layer
    total = fixed + per_layer * layers
    mib = 2**20
    print(
        f"{args.family}: batch {args.batch} x {args.candidates} candidates x ({args.context} shared + {args.reply}) "
        f"tokens, shared prefix {'on' if args.shared_prefix else 'off'}: {per_layer / mib:.1f} MiB per layer, "
        f"{fixed / mib:.1f} MiB fixed -> {total / 2**30:.2f} GiB for {layers} layers"
    )


if __name__ == "__main__":
    main()
