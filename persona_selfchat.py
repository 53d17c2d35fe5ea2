"""Self-chat: the bot over a whole conversation with a partner, its per-turn consistency and the drift curves.

A conversation has N bot turns. Turn t is the partner's message, then the bot's reply to every turn so far (its own
earlier replies, not a dataset's gold ones; the context keeps the last `2*max_history+1` turns, as in chat). The
partner is a second persona bot (the same checkpoint with another persona, or another checkpoint, each with its own
tokenizer and input format) whose first message is the conversation's opening line, or a script of partner turns.
At the probe turns the partner's message is the probe question about one persona fact (`persona_probes`).

Each bot turn is scored (`score_conversations`): `persona_copy` (a persona sentence nearly verbatim), `repeat_self`
(a word 3-gram of an earlier bot turn), with an NLI model `c_score`, `persona_entailment` / `persona_contradiction`
(some persona sentence entailed / contradicted) and `self_contradiction_rate` (the share of earlier bot turns the
turn contradicts), and at probe turns `probe_agreement_persona` / `probe_agreement_first` (key words; `_nli` with an
NLI model: entailment). `drift_curves` averages each metric by turn over the conversations (mean ± 1.96 standard
errors); `drift_summary` gives each metric's mean, least-squares slope over turns and value at its last turn.

Decoding is batched over conversations when it is deterministic (greedy or beam search: the replies do not depend on
the batch); sampled conversations run one at a time, conversation i seeded with `seed + i`, so that a conversation
is the same whatever the batch and the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from persona_errors import UsageError
from persona_generation import generate_replies
from persona_metrics import copies_persona, ngrams, normalize_answer
from persona_probes import PARTNERS, Probe, agrees_with_answer, agrees_with_persona, check_turns, probe_for

logger = logging.getLogger(__name__)

DEFAULT_OPENING = "hi! how are you today?"
REPEAT_N = 3
# The per-turn metrics, in the order of tables and plots.
METRICS = (
    "persona_copy",
    "repeat_self",
    "c_score",
    "persona_entailment",
    "persona_contradiction",
    "self_contradiction_rate",
    "probe_agreement_persona",
    "probe_agreement_first",
    "probe_agreement_persona_nli",
    "probe_agreement_first_nli",
)
Z_95 = 1.959963984540054


@dataclass
class Conversation:
    """One self-chat: the bot's persona, the partner's (or its script), the probe, the turns and their scores."""

    id: int
    persona: list[str]
    partner_persona: list[str] | None = None
    script: list[str] | None = None
    opening: str = DEFAULT_OPENING
    probe: Probe | None = None
    turns: list[dict] = field(default_factory=list)
    scores: list[dict] = field(default_factory=list)

    def texts(self, speaker: str) -> list[str]:
        return [turn["text"] for turn in self.turns if turn["speaker"] == speaker]

    def record(self) -> dict:
        """The conversation as one JSON line: personas, turns, per-turn scores."""
        probe = None if self.probe is None else {**vars(self.probe), "key_words": list(self.probe.key_words)}
        return {
            "id": self.id,
            "persona": self.persona,
            "partner_persona": self.partner_persona,
            "partner": "scripted" if self.script is not None else "bot",
            "probe": probe,
            "turns": self.turns,
            "scores": self.scores,
        }


def _partner_view(conversation: Conversation) -> list[str]:
    """The conversation as the partner sees it: its own turns and the bot's, the bot's last."""
    return [turn["text"] for turn in conversation.turns]


def _run_group(group: list[Conversation], turns: int, probe_turns: set[int], bot, partner, options: dict) -> None:
    """Run `turns` exchanges of every conversation of `group` (batched: one generate call per side and turn)."""
    for t in range(1, turns + 1):
        asked = {}
        for c in group:
            if t in probe_turns and c.probe is not None:
                asked[c.id] = (c.probe.question, True)
            elif c.script is not None:
                asked[c.id] = (c.script[t - 1], False)
            elif t == 1:
                asked[c.id] = (c.opening, False)
        talking = [c for c in group if c.id not in asked]
        if talking:  # the partner bot answers the bot's last reply
            contexts = [(c.partner_persona, _partner_view(c)) for c in talking]
            own = [c.texts("partner") for c in talking]
            texts = generate_replies(*partner, contexts, batch_size=len(talking), own_turns=own, **options)
            asked.update({c.id: (text, False) for c, text in zip(talking, texts)})
        for c in group:
            text, is_probe = asked[c.id]
            c.turns.append({"speaker": "partner", "turn": t, "text": text, **({"probe": True} if is_probe else {})})
        contexts = [(c.persona, [turn["text"] for turn in c.turns]) for c in group]
        own = [c.texts("bot") for c in group]
        replies = generate_replies(*bot, contexts, batch_size=len(group), own_turns=own, **options)
        for c, reply in zip(group, replies):
            c.turns.append({"speaker": "bot", "turn": t, "text": reply})


def self_chat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    personas: Sequence[Sequence[str]],
    *,
    turns: int = 16,
    partner: str = "bot",
    partner_model: PreTrainedModel | None = None,
    partner_tokenizer: PreTrainedTokenizerBase | None = None,
    partner_personas: Sequence[Sequence[str]] | None = None,
    scripts: Sequence[Sequence[str]] | None = None,
    openings: Sequence[str] | None = None,
    probe_turns: Sequence[int] = (),
    probes: Sequence[Probe | None] | None = None,
    ids: Sequence[int] | None = None,
    nli=None,
    max_history: int = 2,
    batch_size: int = 8,
    accelerator=None,
    progress: bool = True,
    **generation_options,
) -> dict:
    """Self-chats of `model` with one conversation per persona of `personas`; returns `{"conversations":
    [Conversation.record()...], "curves": drift_curves, "summary": drift_summary}`.

    `partner="bot"`: a persona bot, `partner_model`/`partner_tokenizer` (default: the bot's own) with
    `partner_personas[i]` (default: the next persona of `personas`), opening with `openings[i]` (default
    `DEFAULT_OPENING`). `partner="scripted"`: `scripts[i]` holds the partner's turns (at least `turns`). At
    `probe_turns` (1-based) the partner asks `probes[i]` (default: `persona_probes.probe_for` of the persona).
    `ids`: the conversations' names (default 0..K-1). `nli`: a `persona_nli.NLIScorer` for the NLI metrics.
    `generation_options`: those of `persona_generation.generate_replies` (both sides decode alike). With an
    `accelerate.Accelerator` the conversations are split over its processes; every process gets every result.
    """
    check_turns(turns, tuple(probe_turns))
    if partner not in PARTNERS:
        raise UsageError(f"partner must be one of {', '.join(PARTNERS)}, got {partner!r}.")
    count = len(personas)
    if count == 0:
        raise UsageError("self_chat needs at least one persona.")
    ids = list(range(count)) if ids is None else list(ids)
    if partner == "scripted":
        if scripts is None or len(scripts) != count:
            raise UsageError("A scripted partner needs one script of partner turns per persona (scripts=...).")
        for i, script in zip(ids, scripts):
            if len(script) < turns:
                raise UsageError(f"Conversation {i}: its script has {len(script)} partner turns; {turns} are needed.")
    elif partner_personas is None:
        if count < 2:
            raise UsageError(
                "A bot partner needs a persona of its own: give two personas or more, or partner_personas."
            )
        partner_personas = [personas[(i + 1) % count] for i in range(count)]
    probes = list(probes) if probes is not None else [probe_for(p) if probe_turns else None for p in personas]
    conversations = [
        Conversation(
            id=ids[i],
            persona=list(personas[i]),
            partner_persona=None if partner == "scripted" else list(partner_personas[i]),
            script=list(scripts[i]) if partner == "scripted" else None,
            opening=openings[i] if openings is not None else DEFAULT_OPENING,
            probe=probes[i],
        )
        for i in range(count)
    ]
    options = dict(generation_options)
    seed = options.pop("seed", None)
    sampled = not options.get("no_sample", False) or options.get("num_ranked", 1) > 1
    bot = (model, tokenizer)
    other = (partner_model or model, partner_tokenizer or tokenizer)
    options["max_history"] = max_history
    rank_zero = accelerator is None or accelerator.is_local_main_process
    loader = DataLoader(range(count), batch_size=1 if sampled else batch_size)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
    done = []
    bar = tqdm(total=count * turns, desc="Self-chat (bot turns)", disable=not (progress and rank_zero))
    for indices in loader:
        group = [_fresh(conversations[i]) for i in indices.tolist()]
        if sampled:
            set_seed((seed or 0) + indices.tolist()[0])
        _run_group(group, turns, set(probe_turns), bot, other, options)
        finished = [(i, c) for i, c in zip(indices.tolist(), group)]
        if accelerator is not None:
            finished = accelerator.gather_for_metrics(finished, use_gather_object=True)
        done.extend(finished)
        bar.update(len(finished) * turns)
    bar.close()
    by_index = dict(done)
    if sorted(by_index) != list(range(count)):
        raise RuntimeError(f"Self-chat finished {len(by_index)} distinct conversations of {count}.")
    conversations = [by_index[i] for i in range(count)]
    score_conversations(conversations, nli=nli, accelerator=accelerator, progress=progress and rank_zero)
    curves = drift_curves(conversations, turns)
    return {"conversations": [c.record() for c in conversations], "curves": curves, "summary": drift_summary(curves)}


def _fresh(conversation: Conversation) -> Conversation:
    """A copy with no turns: the tail of a split over processes runs some conversations twice."""
    return Conversation(**{**vars(conversation), "turns": [], "scores": []})


def repeats_earlier(reply: str, earlier: Sequence[str], n: int = REPEAT_N) -> bool:
    """Whether `reply` shares a word n-gram (F1's normalisation) with one of the `earlier` turns."""
    seen = {g for turn in earlier for g in ngrams(normalize_answer(turn).split(), n)}
    return any(g in seen for g in ngrams(normalize_answer(reply).split(), n))


def _nli_labels(nli, pairs: list[tuple[str, str]], accelerator, progress: bool) -> list[int]:
    """Argmax labels (+1 entailment, 0 neutral, -1 contradiction) of (reply, premise) pairs, one batched pass."""
    from persona_nli import probabilities_to_labels

    if not pairs:
        return []
    return probabilities_to_labels(nli.pair_probabilities(pairs, progress=progress, accelerator=accelerator)).tolist()


def score_conversations(conversations: Sequence[Conversation], nli=None, accelerator=None, progress=False) -> None:
    """Fill each conversation's `scores`: one dict per bot turn (`turn` and the metrics that apply to it)."""
    for c in conversations:
        replies = c.texts("bot")
        c.scores = [
            {
                "turn": t,
                "persona_copy": float(copies_persona(reply, c.persona)),
                "repeat_self": float(repeats_earlier(reply, replies[: t - 1])),
            }
            for t, reply in enumerate(replies, 1)
        ]
        probe_turns = [turn["turn"] for turn in c.turns if turn.get("probe")]
        answers = [replies[t - 1] for t in probe_turns]
        for k, t in enumerate(probe_turns):
            c.scores[t - 1]["probe_agreement_persona"] = float(agrees_with_persona(answers[k], c.probe))
            if k:
                c.scores[t - 1]["probe_agreement_first"] = float(agrees_with_answer(answers[k], answers[0], c.probe))
    if nli is None:
        return
    # Three kinds of pairs in one pass each: reply x persona sentence, reply x earlier reply, probe answers.
    persona_pairs, self_pairs, probe_pairs = [], [], []
    for c in conversations:
        replies = c.texts("bot")
        persona_pairs += [(reply, sentence) for reply in replies for sentence in c.persona]
        self_pairs += [(replies[t], replies[s]) for t in range(len(replies)) for s in range(t)]
        answers = [replies[turn["turn"] - 1] for turn in c.turns if turn.get("probe")]
        probe_pairs += [(a, c.probe.fact) for a in answers] + [(a, answers[0]) for a in answers[1:]]
    persona_labels = iter(_nli_labels(nli, persona_pairs, accelerator, progress))
    self_labels = iter(_nli_labels(nli, self_pairs, accelerator, progress))
    probe_labels = iter(_nli_labels(nli, probe_pairs, accelerator, progress))
    for c in conversations:
        for t, score in enumerate(c.scores, 1):
            labels = [next(persona_labels) for _ in c.persona]
            score.update(
                c_score=float(sum(labels)),
                persona_entailment=float(1 in labels),
                persona_contradiction=float(-1 in labels),
            )
            contradicted = [next(self_labels) == -1 for _ in range(t - 1)]
            if contradicted:
                score["self_contradiction_rate"] = float(np.mean(contradicted))
        probe_turns = [turn["turn"] for turn in c.turns if turn.get("probe")]
        for t in probe_turns:
            c.scores[t - 1]["probe_agreement_persona_nli"] = float(next(probe_labels) == 1)
        for t in probe_turns[1:]:
            c.scores[t - 1]["probe_agreement_first_nli"] = float(next(probe_labels) == 1)


def drift_curves(conversations: Sequence[Conversation], turns: int) -> dict[str, dict]:
    """Each metric by bot turn over the conversations: `turns` (those with a value), `mean`, `ci_low`, `ci_high`
    (mean ± 1.96 standard errors, the sample standard deviation; the mean itself for one value) and `n`."""
    curves = {}
    for metric in METRICS:
        curve = {"turns": [], "mean": [], "ci_low": [], "ci_high": [], "n": []}
        for t in range(1, turns + 1):
            values = [c.scores[t - 1][metric] for c in conversations if metric in c.scores[t - 1]]
            if not values:
                continue
            mean = float(np.mean(values))
            half = Z_95 * float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
            for key, value in zip(curve, (t, mean, mean - half, mean + half, len(values))):
                curve[key].append(value)
        if curve["turns"]:
            curves[metric] = curve
    return curves


def drift_summary(curves: dict[str, dict]) -> dict[str, dict]:
    """Per metric: `mean` (over every scored turn), `slope` (least squares of the curve over the turn index; None
    with one turn), `last` (the curve at its last turn) and `last_turn`."""
    summary = {}
    for metric, curve in curves.items():
        x, y, n = (np.asarray(curve[key], dtype=float) for key in ("turns", "mean", "n"))
        slope = float(np.polyfit(x, y, 1)[0]) if len(x) > 1 else None
        summary[metric] = {
            "mean": float((y * n).sum() / n.sum()),
            "slope": slope,
            "last": float(y[-1]),
            "last_turn": int(x[-1]),
        }
    return summary


def plot_drift(curves: dict[str, dict], path: str, title: str = "Persona drift over a self-chat") -> bool:
    """The drift curves as a PNG (one panel per metric, the 95% interval shaded); False when matplotlib is missing
    (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [m for m in METRICS if m in curves]
    columns = 2
    rows = max(1, math.ceil(len(names) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(8, 2.2 * rows), squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, names):
        curve = curves[name]
        ax.plot(curve["turns"], curve["mean"], marker="o", markersize=3)
        ax.fill_between(curve["turns"], curve["ci_low"], curve["ci_high"], alpha=0.25)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("bot turn", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return True


def dialog_conversations(dialogs, num_conversations: int, turns: int, partner: str, probe_file: str | None = None):
    """The `self_chat` keyword arguments for the first `num_conversations` dialogs with a persona of a split.

    Conversation i is dialog i's persona (`ids`: the dialog indices, 0-based). A bot partner takes the persona of the
    next dialog with one (the last wraps to the first) and opens with the dialog's first turn; a scripted partner
    says the partner turns of the dialog (each utterance's last history turn), then those of the next dialogs, until
    `turns`. Probes: `probe_file`'s (`persona_probes.read_probe_file`), else the rule's.
    """
    from persona_probes import read_probe_file

    rows = [(i, d) for i, d in enumerate(dialogs) if d["personality"]]
    if len(rows) < num_conversations:
        raise UsageError(
            f"--num_conversations {num_conversations}: the split has {len(rows)} dialogs with a persona; ask for at "
            "most that many."
        )
    if partner == "bot" and len(rows) < 2:
        raise UsageError("--partner bot takes another dialog's persona: the split has one dialog with a persona.")
    chosen = rows[:num_conversations]
    personas = [list(d["personality"]) for _, d in chosen]
    out = {"personas": personas, "ids": [i for i, _ in chosen], "partner": partner}
    if partner == "bot":
        out["partner_personas"] = [list(rows[(k + 1) % len(rows)][1]["personality"]) for k in range(len(chosen))]
        out["openings"] = [
            d["utterances"][0]["history"][0] if d["utterances"] and d["utterances"][0]["history"] else DEFAULT_OPENING
            for _, d in chosen
        ]
    else:
        said = [[u["history"][-1] for u in d["utterances"] if u["history"]] for _, d in rows]
        if not any(said):
            raise UsageError("--partner scripted: the split's dialogs hold no partner turn to say.")
        out["scripts"] = []
        for k in range(len(chosen)):
            script, j = [], k
            while len(script) < turns:
                script += said[j % len(rows)]
                j += 1
            out["scripts"].append(script[:turns])
    if probe_file is not None:
        by_id = read_probe_file(probe_file, dict(zip(out["ids"], personas)))
        out["probes"] = [by_id.get(i) for i in out["ids"]]
    return out


def build_report(results: dict, meta: dict, output_file: str) -> dict:
    """The results JSON of a self-chat: `meta` (checkpoint, data, options), the summary, the curves, the files."""
    stem = os.path.splitext(output_file)[0]
    turns = max((len(c["scores"]) for c in results["conversations"]), default=0)
    return {
        **meta,
        "self_chat_turns": turns,
        "conversations": len(results["conversations"]),
        "summary": results["summary"],
        "curves": results["curves"],
        "confidence_interval": "95%: mean +- 1.96 standard errors over the conversations",
        "conversations_file": f"{stem}.conversations.jsonl",
        "plot_file": f"{stem}.png",
    }


def summary_table(summary: dict[str, dict]) -> str:
    """The summary as a terminal table: per metric its mean, slope per turn and value at its last turn."""
    width = max([len(m) for m in summary] + [6])
    lines = [f"{'metric':<{width}}  {'mean':>8}  {'slope/turn':>10}  {'last':>8}  {'at turn':>7}"]
    for metric, v in summary.items():
        slope = "-" if v["slope"] is None else f"{v['slope']:+.4f}"
        lines.append(f"{metric:<{width}}  {v['mean']:>8.3f}  {slope:>10}  {v['last']:>8.3f}  {v['last_turn']:>7}")
    rule = "-" * len(lines[0])
    return "\n".join([rule, lines[0], rule, *lines[1:], rule])


def save_self_chat(results: dict, report: dict, output_file: str) -> str:
    """Write the results JSON, the conversations (JSONL, one a line) and the plot; returns the line saying where the
    plot went, or that it was skipped."""
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(report["conversations_file"], "w", encoding="utf-8") as f:
        for conversation in results["conversations"]:
            f.write(json.dumps(conversation) + "\n")
    if plot_drift(results["curves"], report["plot_file"]):
        return f"Drift plot: {report['plot_file']}"
    return (
        "Drift plot skipped: matplotlib is not installed (pip install 'persona-chat[plot]'); "
        "the curves are in the JSON."
    )
