"""Persona probes: a question about one persona fact, asked at fixed turns of a self-chat, and whether the answers
agree with the fact and with each other.

The turn plan is checked here too (`check_turns`: 1 to `MAX_SELF_CHAT_TURNS` bot turns, probe turns within them),
without torch, so that the command line checks it before anything loads.

The question comes from the persona sentence by one rule (`probe_for`), on the sentence's lower-cased words with the
final punctuation dropped ("i'm" read as "i am"):

- "my X is|are|was|were Y"           -> "what is|are|was|were your X?"      ("my favorite color is blue.")
- "i am|was Y" / "i'm Y"             -> "what are|were you?"                ("i am a nurse.")
- "i can|will|would|could|should Y"  -> "what can|will|... you do?"         ("i can play the guitar.")
- "i VERB to Y"                      -> "what do you VERB to do?"           ("i like to ski.")
- "i VERB in|at|near|on|from Y"      -> "where do you VERB?"                ("i live in paris.")
- "i VERB as|with|for|about|of Y"    -> "what do you VERB as|with|...?"     ("i work as a nurse.")
- "i had Y"                          -> "what did you have?"
- "i VERB Y"                         -> "what do you VERB?"                 ("i love cats.", "i have two dogs.")

VERB is a word that is not a negation (not, never, don't, ...) and does not end in "ed" (past tenses other than
"had" are not turned into questions). The key words of the fact are Y's words (F1's normalisation) without the stop
words below. Any other sentence gives no question; the probed fact of a persona is its first sentence the rule
covers.

An answer *agrees with the persona* when it holds every key word and no negation word; two answers *agree with each
other* when they make the same claim about the fact: the same key words present and the same negation (or none).
With an NLI model the two agreements are entailment of the fact, and of the first answer, by the answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from persona_errors import UsageError
from persona_metrics import normalize_answer

# The longest self-chat: the context keeps a few turns whatever N, so the bound is about time (every bot turn is
# checked against every earlier one by the NLI model: N^2/2 pairs per conversation).
MAX_SELF_CHAT_TURNS = 200
PARTNERS = ("bot", "scripted")

STOP_WORDS = frozenset(
    "i me my you your we our a an the to of and or is are am was were be been do does did in on at for with as it "
    "its that this so very really too also just some".split()
)
# F1's normalisation turns "don't" into "don t": the lone "t" is a negated contraction.
NEGATIONS = frozenset(("no", "not", "never", "nope", "t", "nothing", "neither", "nor"))
_BE = {"is", "are", "was", "were"}
_MODALS = {"can", "will", "would", "could", "should"}
_WHERE = {"in", "at", "near", "on", "from"}
_WHAT_WITH = {"as", "with", "for", "about", "of"}
_NOT_VERBS = {"not", "never", "don't", "dont", "do", "did", "didn't", "cannot", "can't", "won't", "am", "was"}


@dataclass(frozen=True)
class Probe:
    """A question about persona sentence `sentence` (its index) whose answer should hold `key_words`."""

    question: str
    fact: str
    sentence: int
    key_words: tuple[str, ...]


def check_turns(turns: int, probe_turns: Sequence[int] = ()) -> None:
    """A `UsageError` for a number of turns outside 1..MAX_SELF_CHAT_TURNS, or a probe turn outside 1..turns."""
    if isinstance(turns, bool) or not isinstance(turns, int) or not 1 <= turns <= MAX_SELF_CHAT_TURNS:
        raise UsageError(f"--self_chat must be a number of turns between 1 and {MAX_SELF_CHAT_TURNS}, got {turns}.")
    for t in probe_turns:
        if not 1 <= t <= turns:
            raise UsageError(f"--probe_turns: turn {t} is beyond the conversation's {turns} turns (1..{turns}).")
    if len(set(probe_turns)) != len(probe_turns):
        raise UsageError(f"--probe_turns: a turn is given twice ({','.join(map(str, probe_turns))}).")


def parse_probe_turns(text: str) -> tuple[int, ...]:
    """`"2,8,16"` as bot turns (1-based), in the order given.

    >>> parse_probe_turns("2, 8,16")
    (2, 8, 16)
    """
    try:
        turns = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--probe_turns {text!r}: bot turns are whole numbers and commas (2,8,16).") from None
    return turns


def key_words(text: str) -> tuple[str, ...]:
    """The words of `text` (F1's normalisation) without stop words and negations, in order, each once.

    >>> key_words("the two big dogs, and the dogs.")
    ('two', 'big', 'dogs')
    """
    words = [w for w in normalize_answer(text).split() if w not in STOP_WORDS and w not in NEGATIONS]
    return tuple(dict.fromkeys(words))


def question_for(sentence: str) -> tuple[str, str] | None:
    """`(question, Y)` of one persona sentence by the module's rule, or None when the rule does not cover it.

    >>> question_for("I love cats.")
    ('what do you love?', 'cats')
    >>> question_for("my favorite color is blue!")
    ('what is your favorite color?', 'blue')
    >>> question_for("i do not like cats .") is None
    True
    """
    text = re.sub(r"[\s.!?]+$", "", sentence.strip().lower())
    text = re.sub(r"^i'm\b", "i am", text)
    words = text.split()
    if len(words) < 3:
        return None
    first, second, rest = words[0], words[1], words[2:]
    if first == "my":
        be = next((i for i, w in enumerate(words) if w in _BE), None)
        if be is None or be < 2 or be == len(words) - 1:
            return None
        return f"what {words[be]} your {' '.join(words[1:be])}?", " ".join(words[be + 1 :])
    if first != "i":
        return None
    if second in ("am", "was"):
        return f"what {'are' if second == 'am' else 'were'} you?", " ".join(rest)
    if second in _MODALS:
        return (f"what {second} you do?", " ".join(rest)) if rest[0] not in NEGATIONS else None
    if second == "had":
        return "what did you have?", " ".join(rest)
    if second in _NOT_VERBS or second in NEGATIONS or second.endswith("ed") or "'" in second:
        return None
    if rest[0] == "to" and len(rest) > 1:
        return f"what do you {second} to do?", " ".join(rest[1:])
    if rest[0] in _WHERE and len(rest) > 1:
        return f"where do you {second}?", " ".join(rest[1:])
    if rest[0] in _WHAT_WITH and len(rest) > 1:
        return f"what do you {second} {rest[0]}?", " ".join(rest[1:])
    return f"what do you {second}?", " ".join(rest)


def probe_for(persona: Sequence[str]) -> Probe | None:
    """The probe of a persona: the question about its first sentence the rule covers (with key words), or None.

    >>> probe_for(["i do not eat meat.", "i have two dogs."])
    Probe(question='what do you have?', fact='i have two dogs.', sentence=1, key_words=('two', 'dogs'))
    """
    for index, sentence in enumerate(persona):
        found = question_for(sentence)
        if found is not None and key_words(found[1]):
            return Probe(found[0], sentence, index, key_words(found[1]))
    return None


def claim(answer: str, probe: Probe) -> tuple[frozenset[str], bool]:
    """What an answer says about the fact: the fact's key words it holds, and whether it holds a negation."""
    words = set(normalize_answer(answer).split())
    return frozenset(w for w in probe.key_words if w in words), bool(words & NEGATIONS)


def agrees_with_persona(answer: str, probe: Probe) -> bool:
    """Every key word of the fact, no negation.

    >>> probe = probe_for(["i love cats."])
    >>> agrees_with_persona("cats, of course!", probe), agrees_with_persona("not cats", probe)
    (True, False)
    """
    held, negated = claim(answer, probe)
    return len(held) == len(probe.key_words) and not negated


def agrees_with_answer(answer: str, first: str, probe: Probe) -> bool:
    """The same claim about the fact as `first` (the same key words held, the same negation or none)."""
    return claim(answer, probe) == claim(first, probe)


PROBE_FILE_FIELDS = ("persona", "question", "sentence", "key_words")


def read_probe_file(path: str, personas: dict[int, Sequence[str]]) -> dict[int, Probe]:
    """Probes from a JSONL file, one a line: `{"persona": ID, "question": "...", "sentence": INDEX}` (optional
    `"key_words": [...]`), ID being a conversation's dialog index in the split (`personas` maps them) and INDEX the
    persona sentence asked about (default 0). Key words by default: those of the sentence not in the question (all of
    them when the question holds every one). A `UsageError` naming the file and line for anything else."""
    from persona_files import parse_json, read_text

    source = f"--probe_file {path}"
    probes = {}
    for line_no, line in enumerate(read_text(path, source, "a JSONL file of probes", UsageError).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}: line {line_no}"
        record = parse_json(line, where, UsageError)
        if not isinstance(record, dict) or "persona" not in record or "question" not in record:
            raise UsageError(f'{where}: a probe is {{"persona": ID, "question": "...", "sentence": INDEX}}.')
        unknown = sorted(set(record) - set(PROBE_FILE_FIELDS))
        if unknown:
            raise UsageError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(PROBE_FILE_FIELDS)}.")
        persona_id, question, index = record["persona"], record["question"], record.get("sentence", 0)
        if not isinstance(persona_id, int) or isinstance(persona_id, bool) or persona_id not in personas:
            known = sorted(personas)
            shown = ", ".join(map(str, known[:10])) + (", ..." if len(known) > 10 else "")
            raise UsageError(
                f"{where}: unknown persona id {persona_id!r}; the conversations' personas are the dialogs {shown} "
                "of the split (0-based)."
            )
        if not isinstance(question, str) or not question.strip():
            raise UsageError(f"{where}: 'question' must be a non-empty string.")
        persona = personas[persona_id]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(persona):
            raise UsageError(
                f"{where}: 'sentence' {index!r} is not a sentence of persona {persona_id} (0..{len(persona) - 1})."
            )
        if persona_id in probes:
            raise UsageError(f"{where}: persona {persona_id} has a probe already; give one per persona.")
        keys = record.get("key_words")
        if keys is None:
            keys = [w for w in key_words(persona[index]) if w not in key_words(question)] or key_words(persona[index])
        elif not (isinstance(keys, list) and keys and all(isinstance(k, str) and k.strip() for k in keys)):
            raise UsageError(f"{where}: 'key_words' must be a non-empty list of words.")
        keys = tuple(dict.fromkeys(w for k in keys for w in normalize_answer(k).split()))
        probes[persona_id] = Probe(question.strip(), persona[index], index, keys)
    return probes
