"""The model card (`README.md`) of a trained persona model: metadata header, usage, data, recipe and evaluation."""

from __future__ import annotations

import glob
import json
import os

from transformers import TrainingArguments

# Card rows: (label, metric key, format). The convai2_* rows come from persona_eval (--do_convai2_eval).
CARD_METRICS = [
    ("Hits@1", "eval_hits@1", "{:.4f}"),
    ("LM Hits@1 (gold first by the reply's per-token log-probability)", "eval_lm_hits@1", "{:.4f}"),
    ("Perplexity (token-level)", "eval_ppl", "{:.2f}"),
    ("Perplexity (word-level: ParlAI words, end token excluded)", "convai2_ppl_word", "{:.2f}"),
    ("F1 (greedy, ConvAI2 normalisation)", "convai2_f1", "{:.4f}"),
    ("C-score (NLI persona consistency, per reply)", "convai2_c_score", "{:.3f}"),
    ("C-score of the gold replies (same NLI model)", "convai2_c_score_gold", "{:.3f}"),
    ("Replies contradicting their persona", "convai2_contradiction_rate", "{:.3f}"),
    ("Replies copying a persona sentence", "convai2_persona_copy_rate", "{:.3f}"),
    ("Distinct-2 (generated / gold)", ("convai2_distinct_2", "convai2_distinct_2_gold"), "{:.4f}"),
    (
        "Replies repeating an own earlier 3-gram (generated / gold)",
        ("convai2_repeat_self", "convai2_repeat_self_gold"),
        "{:.4f}",
    ),
    ("LM loss", "eval_lm_loss", "{:.4f}"),
    ("MC loss", "eval_mc_loss", "{:.4f}"),
]


def card_metric_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, value) of each `CARD_METRICS` row the metrics hold (a pair of keys shows as 'a / b')."""
    rows = []
    for label, keys, fmt in CARD_METRICS:
        keys = (keys,) if isinstance(keys, str) else keys
        if all(key in metrics for key in keys):
            rows.append((label, " / ".join(fmt.format(metrics[key]) for key in keys)))
    return rows


def self_chat_summary(folder: str) -> dict | None:
    """The newest self-chat results of `folder` (`persona-eval --self_chat` writes `self_chat_<split>.json` into the
    checkpoint folder): `{"turns": N, "summary": {metric: {"mean", "slope", "last", "last_turn"}}}`, or None."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), "self_chat_*.json")):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):  # a file cut short: the card goes without it
            continue
        if isinstance(data, dict) and isinstance(data.get("summary"), dict):
            found.append((os.path.getmtime(path), data))
    if not found:
        return None
    data = max(found, key=lambda item: item[0])[1]
    return {"turns": data.get("self_chat_turns"), "summary": data["summary"]}


def persona_model_card(
    *,
    model_id: str,
    base_model: str | None,
    dataset: str | None,
    recipe: dict,
    args: TrainingArguments,
    metrics: dict,
    is_adapter: bool = False,
    self_chat: dict | None = None,
) -> str:
    """The README.md of a pushed persona model: metadata header, usage, data, recipe and evaluation (with
    `self_chat` (`self_chat_summary`), each drift metric's mean, slope per turn and value at the last turn)."""
    from huggingface_hub import ModelCardData

    is_hub_dataset = bool(dataset) and "://" not in dataset and not os.path.exists(dataset)
    data = ModelCardData(
        library_name="peft" if is_adapter else "transformers",
        base_model=base_model if base_model and not os.path.exists(base_model) else None,
        datasets=[dataset] if is_hub_dataset else None,
        pipeline_tag="text-generation",
        tags=["persona-chat", "conversational", "double-heads"] + (["lora"] if is_adapter else []),
    )
    world = args.world_size
    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    recipe_rows = [
        ("loss", _loss_description(args)),
        ("candidates per example", recipe.get("num_candidates")),
        ("history turns kept", None if "max_history" not in recipe else 2 * recipe["max_history"] + 1),
        ("personality permutations", recipe.get("personality_permutations")),
        ("input format", recipe.get("input_format")),
        # Serving engines must send this system message (the persona in place of {persona}) to prompt as in training.
        ("system prompt", None if recipe.get("system_prompt") is None else f"`{recipe['system_prompt']!r}`"),
        (
            "learning rate",
            f"{args.learning_rate:g} ({getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)})",
        ),
        (
            "batch",
            f"{args.per_device_train_batch_size} per device × {args.gradient_accumulation_steps} accumulation "
            f"× {world} processes = {effective_batch}",
        ),
        ("epochs", f"{args.num_train_epochs:g}" if args.max_steps <= 0 else f"{args.max_steps} steps"),
        ("precision", precision),
        (
            "DeepSpeed",
            os.path.basename(args.deepspeed) if isinstance(args.deepspeed, str) else args.deepspeed and "yes",
        ),
        ("LoRA", "yes (adapter; the MC head and persona-token embeddings are trained in full)" if is_adapter else None),
        ("seed", args.seed),
    ]
    metric_rows = card_metric_rows(metrics)
    lines = [
        f"# {model_id.rstrip('/').split('/')[-1]}",
        "",
        f"A persona chatbot fine-tuned from `{base_model}` with persona-chat's "
        "double-heads recipe (ConvAI2 / TransferTransfo): a language-modelling loss on the gold reply plus a "
        "next-utterance classification loss that picks the gold reply among distractor candidates.",
        "",
        "## Usage",
        "",
        "```python",
        "from persona_chat import PersonaBot",
        "from persona_model import load_model_and_tokenizer",
        "",
        f'model, tokenizer = load_model_and_tokenizer("{model_id}")',
        'bot = PersonaBot(model, tokenizer, persona=["i like to ski .", "i have two dogs ."])',
        'print(bot.reply("hi ! what do you do for fun ?"))',
        "```",
        "",
        "## Training data",
        "",
        f"`{dataset}`" if dataset else "Not recorded.",
        "",
        "## Training recipe",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in recipe_rows if value not in (None, False)],
        "",
        "Every option of the run is in `training_config.yaml`: `persona-train training_config.yaml --output_dir out` "
        "trains it again.",
        "",
        "## Evaluation",
        "",
    ]
    if metric_rows:
        lines += [
            "On the evaluation split; Hits@1 ranks the gold reply among all the candidates of each turn.",
            "",
            "| metric | value |",
            "|---|---|",
            *[f"| {label} | {value} |" for label, value in metric_rows],
        ]
    else:
        lines.append("No evaluation was run.")
    if self_chat:
        lines += [
            "",
            "## Persona over a conversation (self-chat)",
            "",
            f"`persona-eval --self_chat {self_chat.get('turns')}`: the bot answers its own earlier replies; each "
            "metric by bot turn, averaged over the conversations.",
            "",
            "| metric | mean | slope per turn | last turn |",
            "|---|---|---|---|",
            *[
                f"| {name} | {_number(row.get('mean'), '.3f')} | {_number(row.get('slope'), '+.4f')} | "
                f"{_number(row.get('last'), '.3f')} (turn {row.get('last_turn')}) |"
                for name, row in self_chat["summary"].items()
            ],
        ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def _number(value, spec: str) -> str:
    """A card figure, or a dash where a metric had nothing to average (a probe metric without probes)."""
    return "—" if value is None else format(value, spec)


def _loss_description(args) -> str:
    """The objective of the run, as the model card's recipe table says it."""
    heads = f"{args.lm_coef} × LM loss + {args.mc_coef} × multiple-choice loss"
    if getattr(args, "objective", "double_heads") != "dpo":
        return heads
    return f"DPO ({args.dpo_loss}, β = {args.beta}, the gold reply over each rejected one) + {heads}"
