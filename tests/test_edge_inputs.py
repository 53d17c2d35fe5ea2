"""Edge cases a user meets through the console scripts and the demo page: config files in every valid YAML form,
persona-chat's /commands with and without arguments, NLI classifiers with tokenizer quirks, damaged head files,
training that goes non-finite, resuming a run folder under another objective, and the demo's refusals."""

from __future__ import annotations

import io

import pytest
from helpers import error_line

import persona_chat
import persona_eval
import run_persona


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("PERSONA_DEBUG", raising=False)


# --- config files: YAML merge keys load as yaml.safe_load reads them --------------------------------------------


@pytest.mark.parametrize(
    "text, words",
    [
        # The merged value reaches the parser: its check speaks of it.
        ("<<: {gradient_accumulation_steps: 0}\n", "--gradient_accumulation_steps must be >= 1"),
        (
            "base: &b {gradient_accumulation_steps: 2}\n<<: *b\n",
            "unknown option(s) ['base']",  # the form: the anchor's own key is no option of a flat config
        ),
        # A key of the mapping itself overrides the merged one (no duplicate): the next mistake is the one named.
        (
            "<<: &b {gradient_accumulation_steps: 0, per_device_train_batch_size: 1}\n"
            "gradient_accumulation_steps: 1\nper_device_train_batch_size: 0\n",
            "--per_device_train_batch_size must be >= 1",
        ),
        (
            "<<: [&a {gradient_accumulation_steps: 2}, &b {max_train_samples: 0}]\n",
            "--max_train_samples must be >= 1",
        ),
        # The duplicate-key check stays, inside a merged mapping too.
        ("<<: {seed: 1}\nseed: 2\nseed: 3\n", "line 3, column 1: duplicate key 'seed'"),
        ("<<: {seed: 1, seed: 2}\n", "duplicate key 'seed'"),
        ("? [1, 2]\n: 3\n", "not valid YAML (line 1, column 3: found unhashable key)"),
    ],
)
def test_yaml_merge_keys_in_config_files(text, words, tmp_path, capsys):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(text)
    if "duplicate" not in words and "unhashable" not in words:
        yaml.safe_load(text)  # valid YAML, the reference reading
    line = error_line(run_persona.cli, [str(path), "--output_dir", str(tmp_path / "out")], capsys)
    assert words in line and "2002:merge" not in line, line


def test_yaml_merge_keys_set_the_options_they_merge(tmp_path):
    import yaml

    from persona_cli import read_config_file

    text = "common: &c {seed: 7, learning_rate: 0.001}\nrun:\n  <<: *c\n  seed: 9\n"
    path = tmp_path / "merged.yaml"
    path.write_text(text)
    assert (
        read_config_file(str(path))
        == yaml.safe_load(text)
        == {
            "common": {"seed": 7, "learning_rate": 0.001},
            "run": {"seed": 9, "learning_rate": 0.001},
        }
    )


# --- persona-chat's /commands -------------------------------------------------------------------------------


def chat_session(checkpoint, lines, monkeypatch, capsys) -> str:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    argv = ["--model_name_or_path", checkpoint, "--persona", "i love cats.", "--no_sample", "--max_new_tokens", "3"]
    assert persona_chat.cli(argv) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return out


@pytest.mark.parametrize("command", ["/reset", "/quit", "/exit"])
def test_a_command_that_takes_no_argument_says_so(command, persona_checkpoint, monkeypatch, capsys):
    out = chat_session(persona_checkpoint, [f"{command} now", "/persona"], monkeypatch, capsys)
    assert f"({command} takes no argument, got 'now': type {command} alone" in out, out
    assert "unknown command" not in out and "  - i love cats." in out  # the session went on to /persona
    assert "(history cleared)" not in out


def test_commands_as_typed_and_mistyped(persona_checkpoint, monkeypatch, capsys):
    lines = ["/reset", "/persona\ti am a pilot. | i fly.", "/persona | ", "/rset", "/bogus x", "//reset is a word"]
    out = chat_session(persona_checkpoint, lines, monkeypatch, capsys)
    assert "(history cleared)" in out and "  - i am a pilot.\n  - i fly.\n(new persona" in out
    assert "(/persona a. | b. needs sentences between the '|'; the persona is unchanged)" in out
    assert "(unknown command /rset (did you mean /reset?): /reset clears the history" in out
    assert "(unknown command /bogus: /reset clears" in out
    assert out.count(">>> ") == len(lines) + 1  # every line answered, then EOF


# --- persona-eval --nli_model: decoder classifiers and other tokenizer quirks --------------------------------------


def gpt2_nli_classifier(out, tiny_checkpoint, *, pad: str | None = None, padding_side: str = "right") -> str:
    """A tiny GPT-2 sequence classifier with NLI labels, saved without `pad_token_id` in its config (as a decoder
    classifier often is); its tokenizer has no pad token unless `pad` names one."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    tokenizer.pad_token = pad
    tokenizer.padding_side = padding_side
    if pad == "none at all":  # not even an end-of-text, unknown or start token to pad with
        tokenizer.pad_token = tokenizer.eos_token = tokenizer.bos_token = tokenizer.unk_token = None
    assert pad is not None or tokenizer.pad_token_id is None
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2, num_labels=3)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    config.initializer_range = 0.5  # labels that vary with the pair
    config.id2label = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.pad_token_id = None
    GPT2ForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize(
    "pad, padding_side",
    [(None, "right"), (None, "left"), ("<|endoftext|>", "left"), ("none at all", "right")],
    ids=["no-pad", "left", "pad", "no-special-tokens"],
)
def test_persona_eval_scores_a_gpt2_classifier_without_a_padding_token(
    pad, padding_side, tiny_checkpoint, persona_checkpoint, personachat_json, tmp_path, capsys
):
    import json

    import torch
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    nli = gpt2_nli_classifier(tmp_path / "nli", tiny_checkpoint, pad=pad, padding_side=padding_side)
    out = tmp_path / "out.json"
    argv = ["--model_name_or_path", persona_checkpoint, "--dataset_path", personachat_json, "--max_turns", "6"]
    argv += ["--batch_size", "4", "--nli_model", nli, "--nli_batch_size", "7", "--save_predictions"]
    argv += ["--max_new_tokens", "6", "--output_file", str(out)]
    assert persona_eval.cli(argv) == 0, capsys.readouterr().err
    results = json.loads(out.read_text())
    assert "c_score_gold" in results["metrics"]
    # Independent expectation: every (reply, persona sentence) pair scored alone by the saved classifier, no padding.
    model, tokenizer = GPT2ForSequenceClassification.from_pretrained(nli).eval(), AutoTokenizer.from_pretrained(nli)
    assert model.config.pad_token_id is None

    def alone(reply, sentence):
        with torch.no_grad():
            label = model(**tokenizer(reply, sentence, return_tensors="pt")).logits.argmax(-1).item()
        return {"CONTRADICTION": -1, "NEUTRAL": 0, "ENTAILMENT": 1}[model.config.id2label[label]]

    seen = set()
    for turn in results["predictions"]:
        for key, reply in (("nli_labels", turn["reply"]), ("nli_labels_gold", turn["gold"])):
            expected = [alone(reply, sentence) for sentence in turn["persona"]]
            assert turn[key] == expected, (key, reply)
            seen.update(expected)
    assert len(seen) > 1  # the classifier tells pairs apart, so a wrong pooling position would show


def test_persona_eval_passes_a_classifier_only_the_inputs_it_takes(
    tiny_nli_checkpoints, persona_checkpoint, personachat_json, tmp_path, capsys
):
    """A BERT tokenizer returns token_type_ids; a DistilBERT classifier takes none."""
    import json

    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_nli_checkpoints["mnli-style"])
    assert "token_type_ids" in tokenizer("a", "b")
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=128, num_labels=3, initializer_range=0.5)  # fmt: skip
    config.id2label = {0: "entailment", 1: "neutral", 2: "contradiction"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    model = DistilBertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "nli")
    tokenizer.save_pretrained(tmp_path / "nli")
    out = tmp_path / "out.json"
    argv = ["--model_name_or_path", persona_checkpoint, "--dataset_path", personachat_json, "--max_turns", "4"]
    argv += ["--nli_model", str(tmp_path / "nli"), "--save_predictions", "--max_new_tokens", "6"]
    assert persona_eval.cli([*argv, "--output_file", str(out)]) == 0, capsys.readouterr().err
    for turn in json.loads(out.read_text())["predictions"]:
        expected = []
        for sentence in turn["persona"]:
            encoded = tokenizer(turn["gold"], sentence, return_tensors="pt", return_token_type_ids=False)
            with torch.no_grad():
                expected.append((1, 0, -1)[model(**encoded).logits.argmax(-1).item()])
        assert turn["nli_labels_gold"] == expected


# --- a damaged or mismatched multiple_choice_head.safetensors --------------------------------------------------


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_checkpoint) -> str:
    """A tiny Llama persona checkpoint as persona-train saves it: a causal-LM folder plus its head file (hidden 32)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from persona_model import load_model_and_tokenizer

    root = tmp_path_factory.mktemp("llama-head")
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model, tokenizer = load_model_and_tokenizer(str(root / "base"))
    model.save_pretrained(root / "run")
    tokenizer.save_pretrained(root / "run")
    return str(root / "run")


def damaged_heads():
    import torch
    from safetensors.torch import save_file

    def tensors(weight, bias=None):
        return {"summary.weight": weight, "summary.bias": torch.zeros(1) if bias is None else bias}

    def write(kind, path):
        if kind == "other-model":  # the head of a model with hidden size 64
            save_file(tensors(torch.randn(1, 64)), path)
        elif kind == "transposed":
            save_file(tensors(torch.randn(32, 1)), path)
        elif kind == "integers":
            save_file(tensors(torch.ones(1, 32, dtype=torch.int64)), path)
        elif kind == "nan":
            save_file(tensors(torch.full((1, 32), float("nan"))), path)
        elif kind == "other-tensors":
            save_file({"score.weight": torch.randn(3, 32)}, path)
        elif kind == "truncated":
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
        elif kind == "empty":
            open(path, "wb").close()
        elif kind == "text":
            open(path, "w").write("not a tensor file\n")

    expected = {
        "other-model": "summary.weight has shape [1, 64], this model's head needs [1, 32]",
        "transposed": "summary.weight has shape [32, 1], this model's head needs [1, 32]",
        "integers": "summary.weight holds torch.int64 values, not weights",
        "nan": "summary.weight holds non-finite values",
        "other-tensors": "holds ['score.weight'], not the multiple-choice head's tensors (summary.weight [1, 32]",
        "truncated": "not a readable safetensors file (",
        "empty": "not a readable safetensors file (",
        "text": "not a readable safetensors file (",
    }
    return write, expected


@pytest.mark.parametrize("kind", list(damaged_heads()[1]))
def test_a_damaged_head_file_is_one_line_in_persona_eval_and_persona_chat(
    kind, llama_run, personachat_json, tmp_path, capsys, monkeypatch
):
    import shutil

    from persona_backbone import MC_HEAD_FILE

    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    write, expected = damaged_heads()
    write(kind, str(run / MC_HEAD_FILE))
    argv = ["--model_name_or_path", str(run), "--dataset_path", personachat_json, "--max_turns", "2"]
    line = error_line(persona_eval.cli, argv, capsys)
    assert f"{run / MC_HEAD_FILE}: " in line and expected[kind] in line, line
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    line = error_line(
        persona_chat.cli, ["--model_name_or_path", str(run), "--persona", "i like tea.", "--stdin"], capsys
    )
    assert f"{run / MC_HEAD_FILE}: " in line and expected[kind] in line, line


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json"])
def test_a_damaged_json_file_of_a_checkpoint_is_named(name, persona_checkpoint, personachat_json, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(persona_checkpoint, run)
    data = (run / name).read_bytes()
    (run / name).write_bytes(data[: len(data) // 2])  # a copy cut short
    argv = ["--model_name_or_path", str(run), "--dataset_path", personachat_json, "--max_turns", "2"]
    line = error_line(persona_eval.cli, argv, capsys)
    assert line.startswith(f"persona-eval: error: {run / name}: not valid JSON ("), line
    assert line.endswith("the checkpoint is damaged: copy it again or re-train."), line


def test_a_sound_head_file_still_loads(llama_run):
    from persona_model import load_model_and_tokenizer, multiple_choice_head_loaded

    model, _ = load_model_and_tokenizer(llama_run)
    assert multiple_choice_head_loaded(model)


# --- DPO's beta and runs that go non-finite -----------------------------------------------------------------------


def train_argv(checkpoint, data, tmp_path, out, *flags):
    return ["--model_name_or_path", checkpoint, "--dataset_path", data, "--dataset_cache", str(tmp_path / "cache"),
            "--output_dir", str(out), "--num_candidates", "3", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--max_steps", "4", "--do_eval", "false", "--save_strategy", "no",
            "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--max_train_samples", "16",
            "--seed", "1", *flags]  # fmt: skip


@pytest.mark.parametrize(
    "beta, words",
    [("1e30", "--beta 1e+30: out of the range that trains (0.001 to 10"), ("1e-9", "--beta 1e-09: out of the range")],
)
def test_dpo_beta_out_of_range_is_refused_before_loading(
    beta, words, tiny_checkpoint, personachat_json, tmp_path, capsys, monkeypatch
):
    import persona_model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(persona_model, "load_model_and_tokenizer", refuse)
    argv = train_argv(tiny_checkpoint, personachat_json, tmp_path, tmp_path / "run", "--objective", "dpo")
    line = error_line(run_persona.cli, [*argv, "--beta", beta], capsys)
    assert words in line and "0.01-0.5 in practice" in line, line


@pytest.mark.parametrize(
    "flags, likely",
    [
        (["--learning_rate", "1e30"], "--learning_rate 1e+30 is large"),
        (
            ["--objective", "dpo", "--beta", "10", "--learning_rate", "1e30"],
            "--learning_rate 1e+30 is large for fine-tuning (1e-5 to 1e-4 in practice); --beta 10 is large",
        ),
        (["--objective", "dpo", "--learning_rate", "1e30", "--max_grad_norm", "0"], "--learning_rate 1e+30 is large"),
        # A finite loss (about 5e37) whose gradient norm overflows float32: stopped before the optimizer step.
        (
            ["--lm_coef", "1e37", "--mc_coef", "0"],
            "(gradient norm inf); stopped without saving the model: --lm_coef 1e+37",
        ),
    ],
)
def test_a_run_that_goes_non_finite_stops_at_that_step_unsaved(
    flags, likely, tiny_checkpoint, personachat_json, tmp_path, capsys
):
    out = tmp_path / "run"
    line = error_line(run_persona.cli, train_argv(tiny_checkpoint, personachat_json, tmp_path, out, *flags), capsys)
    assert line.startswith("persona-train: error: training went non-finite at step ") and likely in line, line
    step = int(line.split("at step ")[1].split()[0])
    assert 1 <= step <= 4 and "stopped without saving the model" in line
    assert not (out / "model.safetensors").exists()
    if flags == ["--learning_rate", "1e30"]:  # the README shows this line as it is printed
        assert line.split("step ")[1] in " ".join(readme().split()), line


def test_a_finite_run_at_the_edge_of_the_beta_range_trains(tiny_checkpoint, personachat_json, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(tiny_checkpoint, personachat_json, tmp_path, out, "--objective", "dpo", "--beta", "10")
    assert run_persona.cli([*argv, "--learning_rate", "1e-3"]) == 0
    assert (out / "model.safetensors").exists()


def readme() -> str:
    import os

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        return f.read()


# --- resuming a run folder under another objective -------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory, tiny_checkpoint, personachat_json) -> dict[str, str]:
    """A double-heads run and a DPO run of two steps, each with its checkpoint-1 and checkpoint-2."""
    root = tmp_path_factory.mktemp("objective-runs")
    runs = {}
    for objective in ("double_heads", "dpo"):
        out = root / objective
        argv = train_argv(tiny_checkpoint, personachat_json, root, out, "--max_steps", "2", "--save_strategy", "steps",
                          "--save_steps", "1", "--learning_rate", "1e-3")  # fmt: skip
        if objective == "dpo":
            argv += ["--objective", "dpo"]
        assert run_persona.cli(argv) == 0
        runs[objective] = str(out)
    return runs


@pytest.mark.parametrize(
    "before, flags, words",
    [
        ("double_heads", ["--objective", "dpo"], "trained with --objective double_heads"),
        ("dpo", ["--objective", "double_heads"], "trained with --objective dpo"),
        ("dpo", ["--objective", "dpo", "--dpo_loss", "listwise"], "trained with --dpo_loss pairwise"),
    ],
)
@pytest.mark.parametrize("how", ["into-the-folder", "resume_from_checkpoint", "as-long"])
def test_resuming_a_run_under_another_objective_is_refused(
    before, flags, words, how, finished_runs, personachat_json, tmp_path, capsys
):
    import os

    run = finished_runs[before]
    config = open(os.path.join(run, "training_config.yaml")).read()
    contents = sorted(os.listdir(run))
    if how == "into-the-folder":  # the case: a longer run into the folder, from its own weights
        argv = train_argv(run, personachat_json, tmp_path, run, "--max_steps", "4", *flags)
    elif how == "as-long":  # the finished run is as long as asked: not "nothing to do" for another objective
        argv = train_argv(run, personachat_json, tmp_path, run, "--max_steps", "2", *flags)
    else:
        argv = train_argv(run, personachat_json, tmp_path, tmp_path / "new", *flags)
        argv += ["--resume_from_checkpoint", os.path.join(run, "checkpoint-2")]
    line = error_line(run_persona.cli, argv, capsys)
    assert f"{run}: holds a run {words} (training_config.yaml); " in line, line
    if how == "as-long":
        assert "it is finished, and not a run under --" in line and "Pass a new --output_dir" in line, line
    else:
        assert "resuming its checkpoint-2 under --" in line, line
        assert ("Pass a new --output_dir" if how == "into-the-folder" else "Drop --resume_from_checkpoint") in line
    assert open(os.path.join(run, "training_config.yaml")).read() == config and sorted(os.listdir(run)) == contents


def test_a_new_objective_in_a_new_folder_from_the_runs_weights_trains(finished_runs, personachat_json, tmp_path):
    run = finished_runs["double_heads"]
    argv = train_argv(run, personachat_json, tmp_path, tmp_path / "dpo", "--objective", "dpo", "--max_steps", "1")
    assert run_persona.cli(argv) == 0
    assert (tmp_path / "dpo" / "model.safetensors").exists()


# --- persona-demo: a refusal is one log line, never a server traceback -----------------------------------------


@pytest.fixture(scope="module")
def plain_lm_demo(llama_run):
    """The demo over a plain causal LM (no trained multiple-choice head: ranking is refused), on loopback."""
    import os
    import socket

    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e .[demo]")
    from persona_demo import build_demo
    from persona_generation import load_for_chat

    model, tokenizer = load_for_chat(os.path.join(os.path.dirname(llama_run), "base"), device="cpu")
    demo = build_demo(model.eval(), tokenizer, persona=["i love cats."], seed=0, max_message_chars=200)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


DEMO_DECODING = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 4, "greedy": True}


def demo_send(client, message, persona="i love cats.", **options):
    _, chat = client.predict(message, persona, **{**DEMO_DECODING, **options}, api_name="/send")
    return chat


@pytest.mark.parametrize(
    "message, persona, options, words",
    [
        ("hi", "i love cats.", {"greedy": False, "num_ranked": 4}, "multiple-choice head"),
        ("hello " * 50, "i love cats.", {}, "the limit is 200"),
        ("hi", "\n".join(f"i like thing {i}." for i in range(51)), {}, "the limits are 50 sentences"),
    ],
    ids=["ranking-without-a-head", "long-message", "long-persona"],
)
def test_demo_refusals_log_one_line_and_the_session_goes_on(
    message, persona, options, words, plain_lm_demo, capfd, caplog
):
    import logging

    gradio_client = pytest.importorskip("gradio_client")
    client = gradio_client.Client(plain_lm_demo, verbose=False)
    assert len(demo_send(client, "hi there")) == 2
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="persona_demo"):
        with pytest.raises(Exception, match=words):
            demo_send(client, message, persona, **options)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    refused = [r.getMessage() for r in caplog.records if "refused a message" in r.getMessage()]
    assert len(refused) == 1 and words in refused[0] and "\n" not in refused[0], refused
    # The page goes on: the refused message is not in the history, the next one gets its reply.
    chat = demo_send(client, "and now ?")
    assert len(chat) == 4 and [m["role"] for m in chat] == ["user", "assistant"] * 2


def test_demo_keeps_the_traceback_of_a_real_error(plain_lm_demo, capfd, monkeypatch):
    import persona_generation

    gradio_client = pytest.importorskip("gradio_client")

    def broken(*args, **kwargs):
        raise ValueError("a bug inside generation")

    monkeypatch.setattr(persona_generation, "generate_replies", broken)  # what the page calls per message
    client = gradio_client.Client(plain_lm_demo, verbose=False)
    capfd.readouterr()
    with pytest.raises(Exception, match="a bug inside generation"):
        demo_send(client, "hi")
    err = capfd.readouterr().err
    assert "Traceback" in err and "ValueError: a bug inside generation" in err, err
