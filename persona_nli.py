"""Persona consistency by natural-language inference: any NLI sequence classifier judges replies against persona
sentences, its labels read by name.

The C-score (Madotto et al., ACL 2019) gives each (reply, persona sentence) pair +1 for entailment, 0 for neutral and
-1 for contradiction (the argmax label) and sums over the persona's sentences. NLI checkpoints order their labels
differently (roberta-large-mnli: contradiction/neutral/entailment; cross-encoder/nli-deberta-v3:
contradiction/entailment/neutral), so logits are never read by position: `nli_label_order` maps `config.id2label` by
name and refuses what it cannot map.

    scorer = NLIScorer.from_pretrained("MoritzLaurer/DeBERTa-v3-base-mnli-fever-anli")
    scorer.probabilities(["i have two dogs ."], ["i love cats.", "i have dogs."])  # [1, 2, 3]
    scorer.c_scores(["i have two dogs ."], ["i love cats.", "i have dogs."])  # tensor([1])
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, Pipeline

from persona_errors import NLIModelError, UsageError
from persona_hub import hub_options
from persona_metrics import NLI_SCORES, PAIR_ORDERS, reply_c_score

logger = logging.getLogger(__name__)

NLI_LABELS = ("entailment", "neutral", "contradiction")

# The spellings NLI checkpoints use for their labels (after lower-casing and dropping '-', '_' and spaces).
_LABEL_SPELLINGS = {
    "entailment": "entailment",
    "entail": "entailment",
    "entails": "entailment",
    "entailed": "entailment",
    "neutral": "neutral",
    "neutrality": "neutral",
    "contradiction": "contradiction",
    "contradict": "contradiction",
    "contradicts": "contradiction",
    "contradictory": "contradiction",
    "contradicted": "contradiction",
}


def nli_label_order(config, name: str) -> list[int]:
    """The logit indices of entailment, neutral and contradiction in a checkpoint, mapped by name from `id2label`.

    >>> from transformers import PretrainedConfig
    >>> nli_label_order(PretrainedConfig(id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}), "mnli")
    [2, 1, 0]
    """
    id2label = {int(i): str(label) for i, label in (getattr(config, "id2label", None) or {}).items()}
    shown = [id2label[i] for i in sorted(id2label)]
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise NLIModelError(
            f"NLI model {name}: is a {', '.join(architectures)}, not a sequence classifier (labels {shown}); "
            "pass an NLI checkpoint (AutoModelForSequenceClassification with entailment/neutral/contradiction)."
        )
    if len(id2label) != len(NLI_LABELS):
        raise NLIModelError(
            f"NLI model {name}: has {len(id2label)} labels {shown}; an NLI checkpoint has 3 (entailment, neutral, "
            "contradiction)."
        )
    found = {}
    for index, label in id2label.items():
        canonical = _LABEL_SPELLINGS.get(re.sub(r"[\s_\-]", "", label.lower()))
        if canonical is None or canonical in found:
            generic = all(re.fullmatch(r"LABEL_\d+", str(lab)) for lab in shown)
            hint = (
                " (generic names: the order cannot be read; set id2label in its config.json to the names it was "
                "trained with)"
                if generic
                else ""
            )
            raise NLIModelError(f"NLI model {name}: labels {shown} are not entailment/neutral/contradiction{hint}.")
        found[canonical] = index
    return [found[label] for label in NLI_LABELS]


class NLIScorer:
    """Batched NLI over (reply, persona sentence) pairs, probabilities in `NLI_LABELS` order whatever the checkpoint.

    Build it from a loaded `(model, tokenizer)`, a `transformers` text-classification pipeline, or
    `NLIScorer.from_pretrained(name_or_path)`. `pair_order="reply_first"` encodes `[CLS] reply [SEP] persona [SEP]`
    (PAML's order), `"persona_first"` the persona sentence as the premise.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        name: str | None = None,
        pair_order: str = "reply_first",
        batch_size: int = 64,
    ):
        if isinstance(model, Pipeline):
            model, tokenizer = model.model, tokenizer or model.tokenizer
        if tokenizer is None:
            raise ValueError("NLIScorer needs the model's tokenizer (or a text-classification pipeline).")
        if pair_order not in PAIR_ORDERS:
            raise UsageError(f"pair_order {pair_order!r}: use one of {', '.join(PAIR_ORDERS)}.")
        if batch_size < 1:
            raise UsageError(f"batch_size {batch_size}: must be at least 1.")
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pair_order = pair_order
        self.batch_size = batch_size
        self.label_order = nli_label_order(model.config, self.name)
        self.window = self._window()
        self.pad_id = self._padding_id()
        self.input_names = self._input_names()
        self._warned_truncation = False

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        trust_remote_code: bool = False,
        pair_order: str = "reply_first",
        batch_size: int = 64,
    ) -> NLIScorer:
        """Load a Hub id or local folder of an NLI sequence classifier; its labels are checked before the weights."""
        options = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
        options.update(hub_options(name_or_path, revision, token, trust_remote_code, what="NLI model "))
        config = AutoConfig.from_pretrained(name_or_path, **options)
        nli_label_order(config, name_or_path)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, config=config, **({"dtype": dtype} if dtype is not None else {}), **options
            )
        except ValueError as err:  # a model type without a sequence-classification class
            raise NLIModelError(f"NLI model {name_or_path}: not a sequence classifier ({err}).") from err
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **options)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), tokenizer, name=name_or_path, pair_order=pair_order, batch_size=batch_size)

    def _window(self) -> int:
        """The longest pair the model takes: the tokenizer's limit within the model's positions."""
        limits = [getattr(self.tokenizer, "model_max_length", None)]
        limits.append(getattr(self.model.config, "max_position_embeddings", None))
        limits = [int(n) for n in limits if n is not None and 0 < n < 1_000_000]
        return min(limits) if limits else 512

    def _padding_id(self) -> int | None:
        """The id pairs are padded with (on the right, under the attention mask, so every pair scores as it would
        alone): the classifier's own `pad_token_id`, else the tokenizer's pad, end-of-text, unknown or start token,
        set on the classifier's config. A decoder classifier (GPT-2, Llama, Qwen2 ...ForSequenceClassification)
        scores the last token that is not `config.pad_token_id`, so padding with any other id would score a pad.
        None when the tokenizer has none of these tokens: pairs are then scored one at a time, with no padding."""
        try:
            vocab_size = self.model.get_input_embeddings().num_embeddings
        except (AttributeError, NotImplementedError, TypeError):
            vocab_size = None  # a model without an embedding table to check the id against
        tokenizer, config = self.tokenizer, self.model.config
        names = ("pad_token_id", "eos_token_id", "unk_token_id", "bos_token_id")
        options = [getattr(config, "pad_token_id", None), *(getattr(tokenizer, name, None) for name in names)]
        limit = vocab_size if vocab_size is not None else float("inf")
        pad_id = next((i for i in options if isinstance(i, int) and 0 <= i < limit), None)
        if pad_id is None:
            logger.warning("NLI model %s: its tokenizer has no padding token; pairs are scored one by one.", self.name)
        elif pad_id != getattr(config, "pad_token_id", None):
            logger.info("NLI model %s: pairs are padded with token id %d (its pad_token_id).", self.name, pad_id)
            config.pad_token_id = pad_id
        return pad_id

    def _input_names(self) -> set[str] | None:
        """The inputs the classifier's forward names (a tokenizer may return `token_type_ids` that a model without
        token types does not take); None when it takes keyword arguments of any name."""
        import inspect

        parameters = inspect.signature(self.model.forward).parameters.values()
        if any(p.kind == p.VAR_KEYWORD for p in parameters):
            return None
        return {p.name for p in parameters if p.kind != p.VAR_POSITIONAL}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pair_probabilities(
        self, pairs: Sequence[tuple[str, str]], progress: bool = False, accelerator=None
    ) -> torch.Tensor:
        """Probabilities [P, 3] (entailment, neutral, contradiction) of (reply, persona sentence) pairs, on the CPU.

        Pairs are batched by length (little padding) and truncated to the model's window (logged once). With an
        `accelerate.Accelerator`, each process scores every n-th batch and all get every result: the batches are the
        same whatever the number of processes, so the numbers are too.
        """
        from tqdm.auto import tqdm

        if self.pair_order == "persona_first":
            pairs = [(persona, reply) for reply, persona in pairs]
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        scored = []
        for batch in tqdm(batches[rank::world], desc="NLI (persona consistency)", disable=not progress, leave=False):
            scored.append((batch, self._batch_probabilities([pairs[i] for i in batch])))
        if world > 1:
            from accelerate.utils import gather_object

            scored = gather_object(scored)
        out = torch.zeros(len(pairs), len(NLI_LABELS))
        for batch, probabilities in scored:
            out[batch] = probabilities
        return out

    def _batch_probabilities(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        first, second = [a for a, _ in pairs], [b for _, b in pairs]
        encoded = self.tokenizer(first, second, truncation=False)
        if max(len(ids) for ids in encoded["input_ids"]) > self.window:
            if not self._warned_truncation:
                logger.warning(
                    "NLI model %s: pairs longer than its window of %d tokens are truncated.", self.name, self.window
                )
                self._warned_truncation = True
            encoded = self.tokenizer(first, second, truncation=True, max_length=self.window)
        taken = self.input_names
        columns = {name: _as_lists(values) for name, values in encoded.items() if taken is None or name in taken}
        rows = [{name: values[i] for name, values in columns.items()} for i in range(len(pairs))]
        groups = [rows] if self.pad_id is not None else [[row] for row in rows]
        logits = torch.cat([self._logits(group) for group in groups])  # [b, 3] in the checkpoint's order
        return logits[:, self.label_order].softmax(-1).cpu()

    def _logits(self, rows: list[dict[str, list[int]]]) -> torch.Tensor:
        """The classifier's logits of tokenized pairs, padded on the right with `pad_id` (attention 0, types 0)."""
        width = max(len(row["input_ids"]) for row in rows)
        batch = {}
        for name in rows[0]:
            value = self.pad_id if name == "input_ids" else 0
            batch[name] = torch.tensor([row[name] + [value] * (width - len(row[name])) for row in rows])
        if "attention_mask" not in batch and (self.input_names is None or "attention_mask" in self.input_names):
            lengths = torch.tensor([len(row["input_ids"]) for row in rows])
            batch["attention_mask"] = (torch.arange(width) < lengths[:, None]).long()
        batch = {name: value.to(self.device) for name, value in batch.items()}
        with torch.inference_mode():
            return self.model(**batch).logits.float()

    def probabilities(self, replies: Sequence[str], persona: Sequence[str]) -> torch.Tensor:
        """Probabilities [len(replies), len(persona), 3] in `NLI_LABELS` order of every reply against every sentence."""
        pairs = [(reply, sentence) for reply in replies for sentence in persona]
        return self.pair_probabilities(pairs).view(len(replies), len(persona), len(NLI_LABELS))

    def labels(self, replies: Sequence[str], persona: Sequence[str]) -> torch.Tensor:
        """Argmax labels [len(replies), len(persona)]: +1 entailment, 0 neutral, -1 contradiction."""
        return probabilities_to_labels(self.probabilities(replies, persona))

    def c_scores(self, replies: Sequence[str], persona: Sequence[str]) -> torch.Tensor:
        """Per-reply C-score [len(replies)]: the sum of `labels` over the persona's sentences (0 for no sentence)."""
        return torch.tensor([reply_c_score(row) for row in self.labels(replies, persona).tolist()], dtype=torch.long)

    def turn_labels(
        self, replies: Sequence[str], personas: Sequence[Sequence[str]], progress: bool = False, accelerator=None
    ) -> list[list[int]]:
        """Per reply, the label (+1/0/-1) of each sentence of its own persona: one batched pass over every pair
        (spread over the processes of `accelerator`)."""
        pairs = [(reply, sentence) for reply, persona in zip(replies, personas) for sentence in persona]
        probabilities = self.pair_probabilities(pairs, progress=progress, accelerator=accelerator)
        flat = probabilities_to_labels(probabilities).tolist()
        out, start = [], 0
        for persona in personas:
            out.append(flat[start : start + len(persona)])
            start += len(persona)
        return out


def _as_lists(values) -> list[list[int]]:
    """A tokenizer's column (lists, or a tensor or array when the tokenizer returns one) as lists of ids."""
    return values.tolist() if hasattr(values, "tolist") else [list(row) for row in values]


def probabilities_to_labels(probabilities: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dimension (`NLI_LABELS` order) as +1 / 0 / -1."""
    scores = torch.tensor(NLI_SCORES, dtype=torch.long)
    return scores[probabilities.argmax(-1)]
