"""Hand-written sample files in several formats, with the canonical records they must read as (shared by tests)."""

from __future__ import annotations

import datasets

CONVAI2_TXT = (
    "1 your persona: i like cats.\n"
    "2 your persona: i am tall.\n"
    "3 hi there\thello !\t\tbye|hello !|nope\n"
    "4 how are you ?\tfine .\t\tfine .|bad\n"
    "1 your persona: i swim.\n"
    "2 __SILENCE__\they\t\tyo|hey\n"
)
CONVAI2_EXPECTED = [
    {
        "personality": ["i like cats.", "i am tall."],
        "utterances": [
            {"history": ["hi there"], "candidates": ["bye", "nope", "hello !"]},
            {"history": ["hi there", "hello !", "how are you ?"], "candidates": ["bad", "fine ."]},
        ],
    },
    {"personality": ["i swim."], "utterances": [{"history": ["__SILENCE__"], "candidates": ["yo", "hey"]}]},
]
CONVAI2_BOTH_TXT = (
    "1 partner's persona: i hate cats.\n"
    "2 your persona: i like cats.\n"
    "3 partner's persona: i am short.\n"
    "4 hi\thello\t\thello|bye\n"
)
NO_CANDS_TXT = (
    "1 your persona: i like cats.\n2 hi\thello\n3 cats ?\tyes , cats .\n"
    "1 your persona: i like dogs.\n2 hey\tyo\n3 dogs ?\tdogs rule .\n"
    "1 your persona: i like fish.\n2 good day\tgreetings\n"
    "1 your persona: i like birds.\n2 morning\tmorning !\n"
)
SPC_CSV = (
    "user 1 personas,user 2 personas,Best Generated Conversation\n"
    '"I bake.\nI knit.","I am a boy.\nI run.","User 1: Hi!\nUser 2: Hello!\nUser 1: Do you bake?\n'
    'User 2: No, I run.\nEvery day.\n[A few minutes later]\n* User 1: Nice.\nUser 2: Bye."\n'
    '"I swim.","I sing.\n","User 2: Hey there.\nUser 1: Hi, I swim.\nUser 1: A lot.\nUser 2: I sing."\n'
    '"I ski.","I paint.","User 1: Snow!\nUser 2: Paint!"\n'
)
# Hand-parsed: the turns of each conversation (continuation lines joined, stage directions dropped, one speaker's
# consecutive turns merged) and who speaks first.
SPC_TURNS = [
    (["Hi!", "Hello!", "Do you bake?", "No, I run. Every day.", "Nice.", "Bye."], "1"),
    (["Hey there.", "Hi, I swim. A lot.", "I sing."], "2"),
    (["Snow!", "Paint!"], "1"),
]
SPC_PERSONAS = {
    "1": [["I bake.", "I knit."], ["I swim."], ["I ski."]],
    "2": [["I am a boy.", "I run."], ["I sing."], ["I paint."]],
}

# Canonical dialogs (PERSONA-CHAT JSON / JSONL); one without persona, one gold-only.
SMALL = {
    "train": [
        {"personality": ["i like tea."], "utterances": [{"history": ["hi"], "candidates": ["no", "hello"]}]},
        {"personality": [], "utterances": [{"history": ["a", "b", "c"], "candidates": ["d"]}]},
    ],
    "valid": [{"personality": ["x."], "utterances": [{"history": [], "candidates": ["e", "f"]}]}],
}


def write(tmp_path, name: str, text: str) -> str:
    """Write `text` to `tmp_path / name` (UTF-8) and return its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def rows(dialogs: datasets.Dataset) -> list[dict]:
    """The dialogs of a split as plain dicts."""
    return [dict(d) for d in dialogs]


def split_distractors(dialog: dict) -> list[tuple[list[str], str]]:
    """(distractors, gold) of every utterance."""
    return [(u["candidates"][:-1], u["candidates"][-1]) for u in dialog["utterances"]]


def dialog_texts(dialog: dict) -> set[str]:
    """Every turn of a dialog: its history turns and gold replies."""
    return {t for u in dialog["utterances"] for t in [*u["history"], u["candidates"][-1]]}
