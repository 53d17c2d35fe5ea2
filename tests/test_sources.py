"""Sources read through `datasets` (local folders in every layout, the Hub path, offline) and URLs (loopback)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
import time

import datasets
import pytest
from format_samples import CONVAI2_EXPECTED, CONVAI2_TXT, SMALL, SPC_CSV, SPC_PERSONAS, rows

from persona_data import load_dialogs, load_dialogs_with_report
from persona_errors import PersonaDataError

# datasets folders (the Hub path, offline) and column mapping


def test_saved_dataset_folder_with_column_mapping(tmp_path):
    chat = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(
                [{"who": ["i like tea."], "dialog": ["hi", "hello"]}, {"who": [], "dialog": ["hey", "yo"]}]
            ),
            "test": datasets.Dataset.from_list([{"who": ["x."], "dialog": ["a", "b", "c", "d"]}]),
        }
    )
    chat.save_to_disk(str(tmp_path / "chat"))
    dialogs = load_dialogs(str(tmp_path / "chat"), column_mapping="who=persona, dialog=turns", num_distractors=1)
    assert sorted(dialogs) == ["test", "train"]
    assert [d["personality"] for d in dialogs["train"]] == [["i like tea."], []]
    (first,), (second,) = ([u["candidates"] for u in d["utterances"]] for d in dialogs["train"])
    assert first[-1] == "hello" and first[0] in ("hey", "yo") and second[-1] == "yo" and second[0] in ("hi", "hello")
    assert [u["history"] for u in dialogs["test"][0]["utterances"]] == [["a"], ["a", "b", "c"]]
    with pytest.raises(PersonaDataError, match="match no known layout"):
        load_dialogs(str(tmp_path / "chat"))
    with pytest.raises(PersonaDataError, match=r"column_mapping names column\(s\) \['nope'\]"):
        load_dialogs(str(tmp_path / "chat"), column_mapping={"nope": "persona"})


def test_utterance_rows_layout(tmp_path):
    """One row per utterance with a dialog id, as bavard/personachat_truecased on the Hub."""
    table = [
        {"persona": ["i like tea."], "hist": ["hi"], "cands": ["no", "hello"], "dialog_id": 7},
        {"persona": ["i like tea."], "hist": ["hi", "hello", "tea?"], "cands": ["no", "yes"], "dialog_id": 7},
        {"persona": [], "hist": ["a"], "cands": ["b"], "dialog_id": 8},
    ]
    datasets.Dataset.from_list(table).save_to_disk(str(tmp_path / "rows"))
    mapping = {"persona": "personality", "hist": "history", "cands": "candidates", "dialog_id": "conv_id"}
    dialogs, reports = load_dialogs_with_report(str(tmp_path / "rows"), column_mapping=mapping, split="valid")
    assert rows(dialogs["valid"]) == [
        {
            "personality": ["i like tea."],
            "utterances": [
                {"history": ["hi"], "candidates": ["no", "hello"]},
                {"history": ["hi", "hello", "tea?"], "candidates": ["no", "yes"]},
            ],
        },
        {"personality": [], "utterances": [{"history": ["a"], "candidates": ["b"]}]},
    ]
    assert reports["valid"].records == 2


def test_data_files_folder(tmp_path):
    folder = tmp_path / "canonical"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(d) for d in SMALL["train"]))
    dialogs = load_dialogs(str(folder), cache_dir=str(tmp_path / "cache"))
    assert sorted(dialogs) == ["train", "validation"]
    assert rows(dialogs["validation"]) == SMALL["train"]
    spc = tmp_path / "spc"
    spc.mkdir()
    (spc / "train.csv").write_text(SPC_CSV)
    spc_dialogs = load_dialogs(str(spc), "hub", cache_dir=str(tmp_path / "cache"), num_distractors=1)
    assert [d["personality"] for d in spc_dialogs["train"]] == SPC_PERSONAS["2"]


def test_spc_folder_with_columns_of_ones_own(tmp_path, caplog):
    """A folder of Synthetic-Persona-Chat CSVs with an id column reads as the CSV file does, naming the column once."""
    header, body = SPC_CSV.split("\n", 1)
    assert header == "user 1 personas,user 2 personas,Best Generated Conversation"
    spc = tmp_path / "spc"
    spc.mkdir()
    # The id goes last: a record of the sample spans several lines, so only a new header column is simple to add.
    (spc / "train.csv").write_text(header + ",id\n" + body.replace('"\n"', '",1\n"').rstrip("\n") + ",2\n")
    with caplog.at_level("WARNING", logger="persona_sources"):
        dialogs = load_dialogs(str(spc), cache_dir=str(tmp_path / "cache"), num_distractors=1)
    assert [d["personality"] for d in dialogs["train"]] == SPC_PERSONAS["2"]
    assert caplog.text.count("ignoring the column(s) ['id']") == 1


def test_a_damaged_datasets_cache_names_the_way_out(tmp_path):
    """`datasets` caches a data-files folder as Arrow files; one cut short fails in pyarrow naming no file."""
    folder = tmp_path / "canonical"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(d) for d in SMALL["train"]))
    cache = tmp_path / "cache"
    assert load_dialogs(str(folder), cache_dir=str(cache))["train"].num_rows == 2
    arrows = list(cache.rglob("*.arrow"))
    assert arrows
    for arrow in arrows:
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(PersonaDataError) as info:
        load_dialogs(str(folder), cache_dir=str(cache))
    assert str(info.value).startswith(f"{folder}: could not load it as a datasets dataset (a folder): ")
    way_out = f"; if it loaded before, its cache may be damaged: delete {cache} (or pass a fresh --dataset_cache)."
    assert str(info.value).endswith(way_out)
    shutil.rmtree(cache)
    assert load_dialogs(str(folder), cache_dir=str(cache))["train"].num_rows == 2


def test_hub_errors_are_one_clear_line(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"personality": [1, 2], "utterances": 3}\n{"oops": ')
    with pytest.raises(PersonaDataError, match=r"broken: could not load it as a datasets dataset"):
        load_dialogs(str(folder), cache_dir=str(tmp_path / "cache"))


# URLs over a loopback server


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_loading(tmp_path, http_root):
    root, url = http_root
    (root / "personachat.json").write_text(json.dumps(SMALL))
    (root / "train_self_original.txt").write_text(CONVAI2_TXT)
    cache = str(tmp_path / "cache")
    dialogs = load_dialogs(f"{url}/personachat.json", cache_dir=cache)
    assert {split: rows(ds) for split, ds in dialogs.items()} == SMALL
    assert rows(load_dialogs(f"{url}/train_self_original.txt?raw=1", cache_dir=cache)["train"]) == CONVAI2_EXPECTED
    (root / "personachat.json").unlink()  # a second load reads the cached copy
    assert rows(load_dialogs(f"{url}/personachat.json", cache_dir=cache)["valid"]) == SMALL["valid"]
    with pytest.raises(PersonaDataError, match=r"missing.json: download failed"):
        load_dialogs(f"{url}/missing.json", cache_dir=cache)
    # Only complete files are kept: a failed download leaves nothing behind.
    assert len(os.listdir(os.path.join(cache, "downloads"))) == 2


# Downloads that go wrong: nothing is kept, and the same URL works once the server is fixed.

JSONL_LINES = [json.dumps(d) + "\n" for d in SMALL["train"] * 5]


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves `data.jsonl` / `data.json` as `self.server.mode` says: ok, cut, html, trickle or broken."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        mode = self.server.mode
        body = "".join(JSONL_LINES).encode() if self.path.startswith("/data.jsonl") else json.dumps(SMALL).encode()
        ctype = "application/json"
        if mode == "html":
            body, ctype = b"<!DOCTYPE html>\n<html><body>Sign in to continue</body></html>\n", "text/html"
        elif mode == "html_as_json":
            body = b"\n  <html><body>404</body></html>\n"
        elif mode == "broken":
            body = b"not json\n" * 3
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if mode == "cut":  # a connection lost after 3 whole lines: a parseable, shorter file
                self.wfile.write("".join(JSONL_LINES[:3]).encode())
            elif mode == "trickle":
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.wfile.write(body)
        except OSError:  # the client gave up
            pass


@pytest.fixture
def flaky_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    server.daemon_threads = True
    server.mode = "ok"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("mode", "name", "words"),
    [
        ("cut", "data.jsonl", r"download cut short: received \d+ of \d+ bytes"),
        ("cut", "data.json", r"download cut short"),
        ("html", "data.json", r"the server sent a web page \(HTML\)"),
        ("html_as_json", "data.jsonl", r"the server sent a web page \(HTML\)"),
        ("trickle", "data.json", r"download took over 1 s"),
        ("broken", "data.jsonl", r"line 1, column 1: not valid JSON"),  # the reader rejects it: the copy is dropped
        ("broken", "data.json", r"not valid JSON"),
    ],
)
def test_bad_downloads_are_never_cached(tmp_path, flaky_server, monkeypatch, mode, name, words):
    server, url = flaky_server
    monkeypatch.setenv("PERSONA_DOWNLOAD_TIMEOUT", "1")
    cache = str(tmp_path / "cache")
    server.mode = mode
    started = time.monotonic()
    with pytest.raises(PersonaDataError, match=rf"^{url}/{name}: .*{words}"):
        load_dialogs(f"{url}/{name}", cache_dir=cache)
    assert time.monotonic() - started < 10
    assert os.listdir(os.path.join(cache, "downloads")) == []  # no partial, temporary or rejected file
    server.mode = "ok"  # the server fixed: the same URL now loads, all of it
    dialogs = load_dialogs(f"{url}/{name}", cache_dir=cache)
    expected = len(JSONL_LINES) if name == "data.jsonl" else len(SMALL["train"])
    assert dialogs["train"].num_rows == expected


def test_download_timeout_must_be_a_positive_number(tmp_path, monkeypatch):
    for value in ("soon", "0", "-3", "nan", "inf"):
        monkeypatch.setenv("PERSONA_DOWNLOAD_TIMEOUT", value)
        with pytest.raises(PersonaDataError, match="PERSONA_DOWNLOAD_TIMEOUT"):
            load_dialogs("http://127.0.0.1:9/data.json", cache_dir=str(tmp_path))
