"""Malformed inputs: a clear PersonaDataError naming file, line/record and field, or a counted skip; never a crash."""

from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persona_data import load_dialogs, load_dialogs_with_report
from persona_errors import PersonaDataError

BAD_DIR = os.path.join(os.path.dirname(__file__), "bad_inputs")

# file -> (where the error points (None: the file is valid), fields/words it must name, dialogs kept with "skip",
# records skipped with "skip"; None for file-level errors that raise in both modes; kept 0: with "skip" every record
# is skipped, which is an error too).
CORPUS = {
    "json_broken.json": ("not valid JSON (line 1, column 34)", "Expecting", None, None),
    "json_huge_number.json": ("not valid JSON data", "digits", None, None),
    "jsonl_huge_number.jsonl": ("line 2", "not valid JSON data", 1, 1),
    "json_latin1.json": ("line 1", "UTF-8", None, None),
    "json_no_utterances.json": ("split 'train', dialog 1", "'utterances'", 1, 1),
    "json_empty_persona.json": (None, None, 1, 0),
    "json_empty_utterances.json": ("split 'train', dialog 1", "'utterances'", 1, 1),
    "json_gold_empty.json": ("split 'train', dialog 0, utterance 0", "gold reply", 1, 1),
    "json_candidates_not_list.json": ("split 'valid', dialog 1, utterance 0", "'candidates'", 1, 1),
    "json_bom_crlf.json": (None, None, 2, 0),
    "json_top_level_string.json": ("", "object of splits", None, None),
    "json_split_not_list.json": ("split 'train'", "list of dialogs", None, None),
    "json_history_numbers.json": ("split 'train', dialog 0, utterance 0", "'history'", 0, 1),
    "json_long_turn.json": ("split 'train', dialog 1, utterance 0", "over --max_turn_chars 10000", 1, 1),
    "json_no_candidates.json": ("split 'train', dialog 0, utterance 0", "'candidates'", 1, 1),
    # UTF-16 and UTF-32 with a byte-order mark are text ("Unicode" in Windows editors); broken ones name the line.
    "json_utf16.json": (None, None, 1, 0),
    "jsonl_utf16.jsonl": (None, None, 2, 0),
    "convai2_utf16.txt": (None, None, 1, 0),
    "spc_utf16_be_bom.csv": (None, None, 2, 0),
    # byte 416: the mark (2) + 2 lines of 103 characters (412) + "{" (2)
    "jsonl_utf16_broken.jsonl": ("line 3", "not valid UTF-16 text (byte 416 of the file", None, None),
    "jsonl_broken_line.jsonl": ("line 2", "not valid JSON", 2, 1),
    "jsonl_latin1_line.jsonl": ("line 2", "UTF-8", 2, 1),
    "jsonl_missing_personality.jsonl": ("line 1", "'personality'", 1, 1),
    "jsonl_array_line.jsonl": ("line 2", "must be an object", 1, 1),
    "jsonl_bom_crlf.jsonl": (None, None, 2, 0),
    "jsonl_blank_lines.jsonl": (None, None, 2, 0),
    "jsonl_utterance_not_object.jsonl": ("line 1, utterance 0", "utterance must be an object", 1, 1),
    "chat_one_turn.jsonl": ("line 1", "'turns'", 1, 1),
    "chat_missing_turns.jsonl": ("line 1", "'turns'", 1, 1),
    "chat_turns_not_strings.jsonl": ("line 1", "'turns'", 1, 1),
    "chat_empty_persona.jsonl": (None, None, 2, 0),
    "chat_empty_gold.jsonl": ("line 1, utterance 0", "gold reply", 1, 1),
    "convai2_out_of_order.txt": ("line 3", "out of order", 1, 1),
    "convai2_no_number.txt": ("line 2", "line number", 1, 1),
    "convai2_missing_label.txt": ("line 2", "'label'", 1, 1),
    "convai2_label_not_in_cands.txt": ("line 2", "'label'", 1, 1),
    "convai2_starts_at_2.txt": ("line 1", "expected 1", 1, 1),
    "convai2_latin1.txt": ("line 4", "UTF-8", 1, 1),
    "convai2_crlf_bom.txt": (None, None, 2, 0),
    "convai2_persona_only.txt": ("dialog starting at line 1", "'text\\tlabel'", 1, 1),
    "convai2_empty_label.txt": ("line 2", "'label'", 1, 1),
    "convai2_few_no_cands.txt": (None, None, 2, 0),
    "spc_missing_column.csv": ("line 1", "'user 2 personas'", None, None),
    "spc_unterminated_quote.csv": ("record 1 (line 8)", "fields", 1, 1),
    "spc_one_sided.csv": ("record 1 (line 8)", "one-sided", 2, 1),
    "spc_no_turns.csv": ("record 1 (line 8)", "'Best Generated Conversation'", 2, 1),
    "spc_empty_persona.csv": (None, None, 2, 0),
    "spc_latin1.csv": ("line 8", "UTF-8", 2, 1),
    "spc_crlf_bom.csv": (None, None, 2, 0),
    "spc_extra_field.csv": ("record 1 (line 8)", "4 fields", 2, 1),
    "spc_empty.csv": ("", "empty file", None, None),
    "spc_empty_gold.csv": ("record 1 (line 8), utterance 0", "gold reply", 2, 1),
    # A key twice in a JSON object: json would keep the last value and silently drop the first.
    "json_duplicate_split.json": ("line 1, column 1", "duplicate key 'train'", None, None),
    "json_duplicate_personality.json": ("line 3, column 2", "duplicate key 'personality'", None, None),
    "jsonl_duplicate_key.jsonl": ("line 2, column 36", "duplicate key 'history'", 2, 1),
    "chat_duplicate_turns.jsonl": ("line 1, column 1", "duplicate key 'turns'", 1, 1),
    # Optional fields are type-checked, unknown fields (typos) are errors.
    "chat_bot_first_string.jsonl": ("line 1", "field 'bot_first' must be true or false, got 'false'", 1, 1),
    "chat_bot_first_number.jsonl": ("line 2", "field 'bot_first' must be true or false, got 1", 1, 1),
    "chat_unknown_field.jsonl": ("line 1", "unknown field 'bot_frist'", 1, 1),
    # In a file null is a wrong type like any other, not "absent" (leaving the field out is).
    "chat_bot_first_null.jsonl": ("line 1", "field 'bot_first' must be true or false, got null", 1, 1),
    "chat_persona_null.jsonl": ("line 1", "field 'persona' must be a list of strings, got null", 1, 2),
    "chat_rejected_null.jsonl": ("line 2", "field 'rejected' must be a list with one entry per bot turn", 1, 1),
    "jsonl_rejected_null.jsonl": ("line 1, utterance 0", "field 'rejected' must be a list of rejected replies", 1, 1),
    # A ParlAI line has at most 4 tab-separated fields: a fifth would be lost without a word.
    "convai2_fifth_field.txt": ("line 4", "5 tab-separated fields, at most 4 expected", 1, 1),
    # An empty distractor is no choice to learn from, in every format that carries candidates.
    "convai2_empty_distractor.txt": ("dialog starting at line 3, utterance 0", "item 1 (a distractor) is empty", 1, 1),
    "json_empty_distractor.json": ("split 'train', dialog 1, utterance 0", "item 1 (a distractor) is empty", 1, 1),
    "jsonl_blank_distractor.jsonl": ("line 1, utterance 0", "item 0 (a distractor) is empty", 1, 1),
    # A lone UTF-16 surrogate (a JSON escape without its pair) is named by record and field, not by Arrow.
    "json_lone_surrogate.json": ("split 'train', dialog 1", "field 'personality': item 0 holds a lone UTF-16", 1, 1),
    "jsonl_lone_surrogate.jsonl": ("line 1, utterance 0", "field 'candidates': item 1 holds a lone UTF-16", 1, 1),
    "chat_lone_surrogate.jsonl": ("line 2, utterance 0", "field 'history': item 0 holds a lone UTF-16 surrogate", 1, 1),
    "json_unknown_field.json": ("split 'train', dialog 1", "unknown field 'persona'", 1, 1),
    "jsonl_unknown_utterance_field.jsonl": ("line 1, utterance 0", "unknown field 'candidate'", 1, 1),
    # CSV columns and speaker tags.
    "spc_duplicate_column.csv": ("line 1", "'user 2 personas' twice", None, None),
    # Columns of the user's own (ids, notes) are read past, and named once (test_spc_extra_columns_are_named_once).
    "spc_unknown_column.csv": (None, None, 1, 0),
    "spc_extra_columns.csv": (None, None, 2, 0),
    "spc_user3.csv": ("record 1 (line 4)", "unknown speaker 'User 3'", 1, 1),
    # Encodings, binary data and gzip.
    "json_utf32.json": (None, None, 1, 0),
    "jsonl_utf32_be.jsonl": (None, None, 1, 0),
    "spc_utf16_no_bom.csv": ("line 1", "NUL byte (byte 1 of the file)", None, None),
    "convai2_binary.txt": ("line 5", "NUL byte (byte 48 of the file)", None, None),
    "jsonl_gzip.jsonl.gz": (None, None, 2, 0),
    "json_gzip_named_json.json": (None, None, 2, 0),
    "convai2_truncated_gzip.txt.gz": ("", "broken gzip file", None, None),
    # Nothing to read, or nothing left.
    "jsonl_zero_bytes.jsonl": ("", "empty file", None, None),
    "jsonl_only_blank_lines.jsonl": ("split 'train'", "has no dialogs", None, None),
    "convai2_whitespace.txt": ("split 'train'", "has no dialogs", None, None),
    "json_empty_split.json": ("split 'train'", "has no dialogs", None, None),
    "json_empty_object.json": ("", "object of splits", None, None),
    "spc_header_only.csv": ("split 'train'", "has no dialogs", None, None),
    "chat_all_bad.jsonl": ("line 1", "'turns'", 0, 2),
    "convai2_all_bad.txt": ("line 2", "'label'", 0, 2),
    # Valid, but reported: a distractor identical to the gold (see test_gold_in_distractors_is_reported).
    "json_gold_in_distractors.json": (None, None, 2, 0),
}


# Options the corpus is read with, besides the format (a limit lowered to keep the file small).
OPTIONS = {"json_long_turn.json": {"max_turn_chars": 10_000}}


def _format(name: str) -> str | None:
    return "chat_jsonl" if name.startswith("chat_") else None  # a broken first line defeats detection


def test_corpus_is_complete():
    assert sorted(f for f in os.listdir(BAD_DIR) if not f.startswith(".")) == sorted(CORPUS)
    assert sum(where is not None for where, *_ in CORPUS.values()) >= 30


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_bad_input(name):
    where, words, kept, skipped = CORPUS[name]
    path = os.path.join(BAD_DIR, name)
    options = OPTIONS.get(name, {})
    if where is None:
        dialogs = load_dialogs(path, _format(name), **options)
        assert sum(ds.num_rows for ds in dialogs.values()) == kept
        return
    with pytest.raises(PersonaDataError) as info:
        load_dialogs(path, _format(name), **options)
    message = str(info.value)
    assert message.startswith(f"{path}: {where}"), message
    assert words in message
    assert "\n" not in message  # one line
    if kept is None:  # the whole file is unreadable: skipping cannot help
        with pytest.raises(PersonaDataError, match="^" + re.escape(path)):
            load_dialogs(path, _format(name), on_bad_record="skip", **options)
        return
    if kept == 0:  # every record is bad: skipping them all leaves nothing to train on, which is an error too
        all_bad = rf"^{re.escape(path)}: split 'train': all {skipped} records are bad"
        with pytest.raises(PersonaDataError, match=all_bad):
            load_dialogs(path, _format(name), on_bad_record="skip", **options)
        return
    dialogs, reports = load_dialogs_with_report(path, _format(name), on_bad_record="skip", **options)
    assert sum(ds.num_rows for ds in dialogs.values()) == kept
    assert sum(r.skipped for r in reports.values()) == skipped
    # count in == count out + skipped (one dialog per record in these formats)
    assert sum(r.records for r in reports.values()) == kept + skipped
    assert any(where in reason for r in reports.values() for reason in r.reasons)


def test_skip_is_reported_at_the_end(caplog):
    with caplog.at_level("WARNING", logger="persona_records"):
        load_dialogs(os.path.join(BAD_DIR, "jsonl_broken_line.jsonl"), on_bad_record="skip")
    assert "read 3 records, skipped 1 bad ones, kept 2 dialogs" in caplog.text


def test_fewer_distractors_than_requested_are_reported(caplog):
    with caplog.at_level("WARNING", logger="persona_records"):
        dialogs = load_dialogs(os.path.join(BAD_DIR, "convai2_few_no_cands.txt"), num_distractors=5)
    # Dialog 0 may only borrow the 2 turns of dialog 1; dialog 1 gets 4 of dialog 0's turns.
    assert [len(u["candidates"]) for d in dialogs["train"] for u in d["utterances"]] == [3, 3, 5]
    assert "replies got fewer than 5 distractors" in caplog.text


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (
            "huge.jsonl",
            json.dumps({"personality": ["a"], "utterances": [{"history": ["x" * 3_000_000], "candidates": ["b"]}]}),
        ),
        ("huge.txt", "1 your persona: a.\n2 " + "y" * 3_000_000 + "\thi\n"),
        (
            "huge.csv",
            'user 1 personas,user 2 personas,Best Generated Conversation\n"a","b","User 1: '
            + "z" * 3_000_000
            + '\nUser 2: hi"\n',
        ),
    ],
)
def test_huge_single_line(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PersonaDataError, match=r"has a text of 3000\d{3} characters"):
        load_dialogs(str(path))
    assert load_dialogs(str(path), max_turn_chars=None)["train"].num_rows == 1


# A missing file, unknown options and formats.


def test_missing_file(tmp_path):
    with pytest.raises(PersonaDataError, match="nowhere.json: no such file"):
        load_dialogs(str(tmp_path / "nowhere.json"))


FORMAT_FILES = {  # one valid small file per format
    "jsonl": "jsonl_bom_crlf.jsonl",
    "chat_jsonl": "chat_empty_persona.jsonl",
    "convai2_txt": "convai2_crlf_bom.txt",
    "spc_csv": "spc_crlf_bom.csv",
    "personachat_json": "json_bom_crlf.json",
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_FILES))
def test_file_system_problems(tmp_path, fmt):
    """Missing, a folder, a link loop, a dangling link, a FIFO: one line naming the path, in every format."""
    name = FORMAT_FILES[fmt]
    cases = {}
    cases["missing"] = (str(tmp_path / f"nowhere-{name}"), "no such file")
    folder = tmp_path / "folder"
    folder.mkdir()
    cases["folder"] = (str(folder), "is a folder")
    loop = tmp_path / f"loop-{name}"
    loop.symlink_to(loop)
    cases["loop"] = (str(loop), "cannot be opened")
    dangling = tmp_path / f"dangling-{name}"
    dangling.symlink_to(tmp_path / "gone")
    cases["dangling"] = (str(dangling), "cannot be opened")
    fifo = tmp_path / f"fifo-{name}"
    os.mkfifo(fifo)
    cases["fifo"] = (str(fifo), "not a regular file")  # reading it would block forever
    for case, (path, words) in cases.items():
        with pytest.raises(PersonaDataError) as info:
            load_dialogs(path, fmt)
        assert str(info.value).startswith(f"{path}: {words}"), (case, str(info.value))


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("", "the data path is empty; pass a file"),
        ("  ", "the data path is empty; pass a file"),
        ("ftp://example.org/d.json", "ftp://example.org/d.json: URLs must start with http:// or https://, not ftp://"),
        ("file:///tmp/d.json", "file:///tmp/d.json: URLs must start with http:// or https://, not file://"),
    ],
)
def test_empty_path_and_unsupported_url_scheme(path, words):
    with pytest.raises(PersonaDataError) as info:
        load_dialogs(path, "personachat_json")
    assert str(info.value).startswith(words), str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(open(os.path.join(BAD_DIR, "jsonl_bom_crlf.jsonl"), "rb").read())
    path.chmod(0)
    with pytest.raises(PersonaDataError, match=r"data.jsonl: permission denied"):
        load_dialogs(str(path))


def test_empty_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PersonaDataError, match=r"empty: could not load it as a datasets dataset \(a folder\)"):
        load_dialogs(str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))


def test_options_that_do_not_apply(tmp_path):
    """An option that cannot apply to the chosen format is an error naming the flag, not silently ignored."""
    for fmt, name in FORMAT_FILES.items():
        path = os.path.join(BAD_DIR, name)
        with pytest.raises(PersonaDataError, match=r"--column_mapping renames the columns of a `datasets` source"):
            load_dialogs(path, fmt, column_mapping="a=persona")
        if fmt == "spc_csv":
            assert load_dialogs(path, fmt, spc_bot_role="user1")["train"].num_rows == 2
        else:
            with pytest.raises(PersonaDataError, match=rf"--spc_bot_role applies to .* not to {fmt}"):
                load_dialogs(path, fmt, spc_bot_role="both")
    # --split names the split of a one-split file: on a file of several splits it would be ignored.
    with pytest.raises(PersonaDataError, match=r"this file has the splits \['train', 'valid'\]; drop --split"):
        load_dialogs(os.path.join(BAD_DIR, "json_bom_crlf.json"), split="test")
    assert list(load_dialogs(os.path.join(BAD_DIR, "jsonl_bom_crlf.jsonl"), split="test")) == ["test"]
    # A datasets folder that is not Synthetic-Persona-Chat: --spc_bot_role cannot apply.
    import datasets

    datasets.Dataset.from_list([{"persona": ["a."], "turns": ["hi", "yo"]}]).save_to_disk(str(tmp_path / "chat"))
    with pytest.raises(PersonaDataError, match=r"chat: split 'train': --spc_bot_role applies to Synthetic"):
        load_dialogs(str(tmp_path / "chat"), spc_bot_role="user1")


def test_gold_in_distractors_is_reported(caplog):
    path = os.path.join(BAD_DIR, "json_gold_in_distractors.json")
    with caplog.at_level("WARNING", logger="persona_records"):
        dialogs, reports = load_dialogs_with_report(path)
    assert reports["train"].gold_in_distractors == 1 and reports["train"].replies == 2
    assert "split 'train': 1 of 2 replies have a distractor identical to the gold reply" in caplog.text
    # Sampled distractors never repeat the gold (a text of the dialog's own group is never drawn).
    with caplog.at_level("WARNING", logger="persona_records"):
        _, reports = load_dialogs_with_report(os.path.join(BAD_DIR, "convai2_few_no_cands.txt"), num_distractors=5)
    assert reports["train"].gold_in_distractors == 0


def test_error_hints_name_the_flags(tmp_path):
    with pytest.raises(PersonaDataError, match=r"\(or pass --on_bad_record skip to skip and count bad records\)$"):
        load_dialogs(os.path.join(BAD_DIR, "jsonl_broken_line.jsonl"))
    (tmp_path / "data.xml").write_text("x")
    with pytest.raises(PersonaDataError, match=r"pass --dataset_format \(one of"):
        load_dialogs(str(tmp_path / "data.xml"))


def test_unknown_option_and_format(tmp_path):
    path = os.path.join(BAD_DIR, "json_empty_persona.json")
    with pytest.raises(ValueError, match="num_candidate"):
        load_dialogs(path, num_candidate=3)
    with pytest.raises(ValueError, match="Unknown --dataset_format 'xml'"):
        load_dialogs(path, "xml")
    with pytest.raises(ValueError, match="on_bad_record"):
        load_dialogs(path, on_bad_record="ignore")
    with pytest.raises(PersonaDataError, match="cannot tell the format"):
        (tmp_path / "data.bin").write_text("x")
        load_dialogs(str(tmp_path / "data.bin"))


# Fuzzing: whatever the bytes, a reader returns dialogs or raises PersonaDataError (or nothing else).

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_dialogish = st.fixed_dictionaries(
    {},
    optional={
        "personality": st.lists(_text, max_size=3) | _json_value,
        "utterances": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "history": st.lists(_text, max_size=3) | _json_value,
                    "candidates": st.lists(_text, max_size=3),
                },
            ),
            max_size=3,
        )
        | _json_value,
        "persona": st.lists(_text, max_size=3) | _json_value,
        "turns": st.lists(_text, max_size=5) | _json_value,
    },
)
_line = st.one_of(
    _dialogish.map(json.dumps),
    _json_value.map(json.dumps),
    st.builds(lambda n, t: f"{n} {t}", st.integers(0, 5), _text),
    st.builds(lambda n, a, b, c: f"{n} {a}\t{b}\t\t{c}", st.integers(1, 4), _text, _text, _text),
    _text,
)
_bytes_file = st.one_of(
    st.lists(_line, max_size=8).map(lambda lines: "\n".join(lines).encode()),
    st.binary(max_size=200),
)

FUZZ_FORMATS = {"a.json": None, "a.jsonl": None, "chat.jsonl": "chat_jsonl", "a.txt": None, "a.csv": None}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_bytes_file, name=st.sampled_from(sorted(FUZZ_FORMATS)), skip=st.booleans())
def test_fuzz_readers(tmp_path, data, name, skip):
    path = tmp_path / name
    if name.endswith(".csv"):  # give the CSV reader a header half of the time so rows get parsed
        data = (b"user 1 personas,user 2 personas,Best Generated Conversation\n" if len(data) % 2 else b"") + data
    path.write_bytes(data)
    try:
        dialogs, reports = load_dialogs_with_report(
            str(path), FUZZ_FORMATS[name], on_bad_record="skip" if skip else "error", num_distractors=2
        )
    except PersonaDataError as err:
        assert str(err).startswith(str(path))
        return
    for split, ds in dialogs.items():
        assert ds.num_rows == reports[split].records - reports[split].skipped
        for dialog in ds:
            for u in dialog["utterances"]:
                assert u["candidates"] and u["candidates"][-1].strip()
