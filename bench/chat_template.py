#!/usr/bin/env python
"""Chat-template rows vs speaker-token rows on one tiny Qwen2 backbone and the same dialogs, in one run.

Measures training throughput (forward + backward + AdamW step, examples/s), evaluation time (ranking every
candidate of a turn, no gradients) and the context-sharing speed-up of both row formats (the automatic candidate
encoding, packed where it applies, vs the plain one). The tokenizer is a byte-level BPE trained here with ChatML
special tokens and a ChatML template with a system role (Qwen2.5's layout); the speaker-token rows use the same
tokenizer with the five persona tokens added.

    python bench/chat_template.py
    python bench/chat_template.py --dataset_path ../shared/data/Synthetic-Persona-Chat_valid.csv
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_tokenizer(texts: list[str], workdir: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(workdir)
    return AutoTokenizer.from_pretrained(workdir)


def timed_steps(model, batches, *, train: bool, shared: bool) -> float:
    """Seconds per batch, after one warm-up batch."""
    from persona_encoding import set_candidate_encoding

    set_candidate_encoding(model, "auto" if shared else "plain")
    model.train(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    times = []
    for batch in batches:
        start = time.perf_counter()
        if train:
            out = model(**batch)
            (out.lm_loss + out.mc_loss).backward()
            optimizer.step()
            optimizer.zero_grad()
        else:
            with torch.no_grad():
                model(**batch)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / len(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=None, help="Default: synthetic dialogs.")
    parser.add_argument("--num_candidates", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    from bench_data import bench_dialogs
    from transformers import Qwen2Config

    from persona_backbone import PersonaDoubleHeadsConfig, PersonaDoubleHeadsModel
    from persona_chat_template import ChatFormat
    from persona_collator import PersonaCollator
    from persona_data import build_features
    from persona_tokens import add_special_tokens

    torch.manual_seed(0)
    workdir = tempfile.mkdtemp(prefix="bench-chat-")
    dialogs, texts = bench_dialogs(args.dataset_path, workdir, num_train=40)
    chat_tok = chatml_tokenizer(texts, os.path.join(workdir, "chat"))
    speaker_tok = chatml_tokenizer(texts, os.path.join(workdir, "speaker"))
    add_special_tokens(None, speaker_tok)
    options = dict(max_history=2, max_length=512)
    rows = {
        "chat_template": (chat_tok, dict(input_format=ChatFormat.from_tokenizer(chat_tok))),
        "speaker_tokens": (speaker_tok, {}),
    }
    need = args.batch_size * (args.steps + 1)
    results = {}
    for name, (tok, extra) in rows.items():
        train = build_features(dialogs, tok, num_candidates=args.num_candidates, **options, **extra)
        evals = build_features(dialogs, tok, num_candidates=None, **options, **extra)
        collate = PersonaCollator(tok.pad_token_id)
        most = max(len(c) for c in evals["input_ids"])
        evals = evals.filter(lambda r, most=most: len(r["input_ids"]) == most)  # one candidate count per batch
        train_batches, eval_batches = (
            [collate(list(ds.select(range(i, i + args.batch_size)))) for i in range(0, need, args.batch_size)]
            for ds in (train, evals)
        )
        backbone = Qwen2Config(
            vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=4 * args.hidden, attn_implementation="sdpa",
        )  # fmt: skip
        model = PersonaDoubleHeadsModel(PersonaDoubleHeadsConfig.from_backbone(backbone, summary_first_dropout=0.0))
        tokens = sum(int(b["attention_mask"].sum()) for b in train_batches) / len(train_batches)
        results[name] = {
            "tokens_per_batch": tokens,
            "train_shared": timed_steps(model, train_batches, train=True, shared=True),
            "train_full": timed_steps(model, train_batches, train=True, shared=False),
            "eval_shared": timed_steps(model, eval_batches, train=False, shared=True),
            "eval_full": timed_steps(model, eval_batches, train=False, shared=False),
            "eval_candidates": most,
        }
    torch_threads = torch.get_num_threads()
    print(f"Tiny Qwen2 (hidden {args.hidden}, {args.layers} layers), batch {args.batch_size}, {torch_threads} threads")
    for name, r in results.items():
        print(
            f"{name:15s} {r['tokens_per_batch']:7.0f} tokens/batch  train {args.batch_size / r['train_shared']:6.1f} "
            f"ex/s  eval ({r['eval_candidates']} cands) {r['eval_shared'] * 1000:6.1f} ms/batch  auto-encoding "
            f"speed-up train x{r['train_full'] / r['train_shared']:.2f}, eval x{r['eval_full'] / r['eval_shared']:.2f}"
        )
    chat, speaker = results["chat_template"], results["speaker_tokens"]
    print(
        f"chat_template / speaker_tokens: train throughput x{speaker['train_shared'] / chat['train_shared']:.2f}, "
        f"eval time x{chat['eval_shared'] / speaker['eval_shared']:.2f}, "
        f"tokens per batch x{chat['tokens_per_batch'] / speaker['tokens_per_batch']:.2f}"
    )


if __name__ == "__main__":
    main()
