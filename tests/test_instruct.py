"""Instruct backbones end to end through their own chat template: features, model, training, reload as a plain causal
LM, persona-chat / persona-eval, LoRA, DeepSpeed ZeRO-2/3, `transformers serve`, and the command-line errors."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest
import torch
from helpers import INSTRUCT_FAMILIES as FAMILIES
from helpers import (
    LLAMA3_TEMPLATE,
    NON_PREFIX_TEMPLATE,
    backbone_config,
    chat_ids,
    error_line,
    free_port,
    reference_messages,
    run_cli,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from persona_backbone import PersonaDoubleHeadsConfig, PersonaDoubleHeadsModel
from persona_chat_options import DEFAULT_SYSTEM_PROMPT
from persona_chat_template import ChatFormat
from persona_collator import PersonaCollator
from persona_data import build_features, load_dialogs
from persona_encoding import set_candidate_encoding
from persona_formats import input_format_of
from persona_generation import generate_reply_ids
from persona_model import load_model_and_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PROMPT = "Stay in character. You are:\n{persona}"
PERSONA = ["i love cats .", "i am a nurse ."]
HISTORY = ["hello , how are you today ?"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory, dialogs) -> str:
    from persona_synthetic import make_synthetic_personachat

    path = tmp_path_factory.mktemp("instruct-data") / "personachat.json"
    path.write_text(json.dumps(make_synthetic_personachat(num_train=12, num_valid=4, seed=1)))
    return str(path)


def train_args(checkpoint: str, data: str, out, *extra: str, steps: int = 30) -> list[str]:
    return [
        "--model_name_or_path", checkpoint, "--dataset_path", data, "--dataset_cache", str(out) + "-cache",
        "--output_dir", str(out), "--num_candidates", "3", "--max_history", "1",
        "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--lr_scheduler_type", "constant",
        "--max_steps", str(steps), "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
        "--use_cpu", "true", "--report_to", "none", "--seed", "0", *extra,
    ]  # fmt: skip


def losses(out) -> list[float]:
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
        return [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def trained(instruct_checkpoints, data_path, tmp_path_factory) -> dict[str, str]:
    """Each tiny instruct backbone trained by persona-train with chat-template rows and a custom system prompt."""
    from run_persona import cli

    out = {}
    for family, checkpoint in instruct_checkpoints.items():
        folder = tmp_path_factory.mktemp(f"trained-{family}") / "run"
        assert cli(train_args(checkpoint, data_path, folder, "--system_prompt", SYSTEM_PROMPT)) == 0
        out[family] = str(folder)
    return out


def test_build_features_chat_rows_follow_the_speaker_token_policy(tokenizers, data_path):
    tok = tokenizers["chatml"]
    fmt = ChatFormat.from_tokenizer(tok)
    dialogs = load_dialogs(data_path)["train"].select(range(3))
    rows = build_features(dialogs, tok, num_candidates=3, max_history=1, personality_permutations=2, input_format=fmt)
    assert set(rows.column_names) == {"input_ids", "mc_token_ids", "labels", "mc_labels"}
    expected = []  # written out independently: permutation (persona rotated by one), then utterance
    for dialog in dialogs:
        persona = list(dialog["personality"])
        for _ in range(2):
            for u in dialog["utterances"]:
                candidates = u["candidates"][-3:]
                expected.append([chat_ids(tok, reference_messages(persona, u["history"][-3:], c)) for c in candidates])
            persona = [persona[-1]] + persona[:-1]
    assert rows["input_ids"] == expected and set(rows["mc_labels"]) == {2}
    batch = PersonaCollator(tok.pad_token_id)(list(rows.select(range(4))))
    assert "token_type_ids" not in batch and batch["input_ids"].shape[:2] == (4, 3)
    # The cache tells the formats and the system prompts apart.
    other = build_features(
        dialogs,
        tok,
        num_candidates=3,
        max_history=1,
        input_format=ChatFormat.from_tokenizer(tok, system_prompt="{persona}"),
    )
    assert other["input_ids"][0] != rows["input_ids"][0]
    first = dialogs[0]["utterances"][0]
    gold = reference_messages(dialogs[0]["personality"], first["history"], first["candidates"][-1], "{persona}")
    assert other["input_ids"][0][-1] == chat_ids(tok, gold)
    with pytest.raises(ValueError, match="candidates but --num_candidates 50"):
        build_features(dialogs, tok, num_candidates=50, max_history=1, input_format=fmt)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loader_adds_nothing_and_records_the_format(instruct_checkpoints, family, tmp_path):
    model, tokenizer = load_model_and_tokenizer(instruct_checkpoints[family])
    plain = AutoTokenizer.from_pretrained(instruct_checkpoints[family])
    assert len(tokenizer) == len(plain) and "<speaker1>" not in tokenizer.get_vocab()
    assert model.get_input_embeddings().num_embeddings == len(plain)
    assert tokenizer.pad_token_id is not None and model.config.pad_token_id == tokenizer.pad_token_id
    fmt = input_format_of(tokenizer)
    assert fmt.kind == "chat_template" and fmt.system_prompt == DEFAULT_SYSTEM_PROMPT
    end_of_turn = plain.convert_tokens_to_ids({"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}[family])
    assert model.generation_config.eos_token_id[0] == end_of_turn
    # Explicitly asking for speaker tokens gives the reference layout on the same backbone, and it is recorded.
    model, tokenizer = load_model_and_tokenizer(instruct_checkpoints[family], input_format="speaker_tokens")
    assert "<speaker1>" in tokenizer.get_vocab() and input_format_of(tokenizer).kind == "speaker_tokens"
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["persona_input_format"] == {
        "input_format": "speaker_tokens"
    }


def test_gpt2_defaults_to_speaker_tokens(tiny_checkpoint):
    _, tokenizer = load_model_and_tokenizer(tiny_checkpoint)
    assert input_format_of(tokenizer).kind == "speaker_tokens" and "<speaker1>" in tokenizer.get_vocab()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_candidate_encoding_equals_the_plain_path_on_chat_rows(tokenizers, data_path, family):
    """Cache broadcast and packed rows give the plain path's outputs; the plain path's LM loss is the causal LM's own
    cross-entropy on each gold row."""
    tok = tokenizers[FAMILIES[family]]
    rows = build_features(
        load_dialogs(data_path)["train"].select(range(2)),
        tok,
        num_candidates=4,
        max_history=2,
        input_format=ChatFormat.from_tokenizer(tok, system_prompt=SYSTEM_PROMPT),
    )
    batch = PersonaCollator(tok.eos_token_id)(list(rows.select(range(3))))  # pads are masked: any id
    torch.manual_seed(0)
    config = PersonaDoubleHeadsConfig.from_backbone(backbone_config(family, len(tok)), summary_first_dropout=0.0)
    model = PersonaDoubleHeadsModel(config).eval()
    outputs = {}
    for encoding in ("plain", "shared_prefix", "packed"):
        set_candidate_encoding(model, encoding)
        with torch.no_grad():
            outputs[encoding] = model(**batch)
    for encoding, key in itertools.product(("shared_prefix", "packed"), ("lm_nll", "mc_logits", "mc_nll")):
        torch.testing.assert_close(
            getattr(outputs[encoding], key), getattr(outputs["plain"], key), rtol=1e-4, atol=1e-5
        )
    # Independently: the same weights as a plain causal LM, summed cross-entropy over each gold row's labels.
    lm = AutoModelForCausalLM.from_config(backbone_config(family, len(tok))).eval()
    missing, _ = lm.load_state_dict(model.state_dict(), strict=False)
    assert not [k for k in missing if k not in lm._tied_weights_keys]
    gold_ids, gold_labels = batch["input_ids"][:, -1], batch["labels"][:, -1]  # [B, T]: the gold is the last candidate
    with torch.no_grad():
        logits = lm(input_ids=gold_ids, attention_mask=batch["attention_mask"][:, -1]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), gold_labels[:, 1:], ignore_index=-100, reduction="none"
    ).sum(1)
    torch.testing.assert_close(outputs["plain"].lm_nll, expected, rtol=1e-4, atol=1e-4)
    # The end-of-reply NLL (left out of the word-level perplexity) is the template's end-of-turn token's, everywhere.
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), gold_labels[:, 1:], ignore_index=-100, reduction="none"
    )  # [B, T-1]
    last = [int((row != -100).nonzero().max()) for row in gold_labels[:, 1:]]
    stops = ChatFormat.from_tokenizer(tok, system_prompt=SYSTEM_PROMPT).stop_ids
    assert all(int(gold_labels[i, 1 + j]) in stops for i, j in enumerate(last))
    end_nll = torch.stack([per_token[i, j] for i, j in enumerate(last)])
    for encoding in ("plain", "shared_prefix", "packed"):
        torch.testing.assert_close(outputs[encoding].lm_end_nll, end_nll, rtol=1e-4, atol=1e-4)
    # The shared context really is the system prompt, the history and the assistant header.
    from persona_shared_prefix import shared_prefix_lengths

    lengths = shared_prefix_lengths(batch["input_ids"], None, batch["attention_mask"], batch["mc_token_ids"],
                                    batch["labels"])  # fmt: skip
    prompt = ChatFormat.from_tokenizer(tok, system_prompt=SYSTEM_PROMPT).context_ids(
        load_dialogs(data_path)["train"][0]["personality"],
        load_dialogs(data_path)["train"][0]["utterances"][0]["history"],
    )
    assert int(lengths[0]) == len(prompt) - 1  # the header's last token predicts the reply's first


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_reload_as_causal_lm_same_greedy_reply(trained, family):
    history = losses(trained[family])
    assert sum(history[-5:]) / 5 < 0.9 * sum(history[:5]) / 5, history
    folder = trained[family]
    assert not os.path.exists(os.path.join(folder, "added_tokens.json"))
    record = json.loads(open(os.path.join(folder, "tokenizer_config.json")).read())["persona_input_format"]
    assert record == {"input_format": "chat_template", "system_prompt": SYSTEM_PROMPT}

    # persona-chat's greedy reply, through the project's loader.
    model, tokenizer = load_model_and_tokenizer(folder)
    (ours,) = generate_reply_ids(model.eval(), tokenizer, [(PERSONA, HISTORY)], no_sample=True, max_new_tokens=12)
    assert ours

    # A plain causal LM and the tokenizer's chat template, written without the project.
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    plain_tok = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": SYSTEM_PROMPT.replace("{persona}", "\n".join(PERSONA))}]
    messages += [{"role": "user", "content": HISTORY[0]}]
    prompt = plain_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        output = plain.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0, len(prompt) :].tolist()
    stops = plain.generation_config.eos_token_id
    end = next((i for i, t in enumerate(output) if t in stops), len(output))
    assert output[:end] == ours
    assert stops[0] == plain_tok.convert_tokens_to_ids({"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}[family])

    # persona-chat's console script gives that reply.
    result = run_cli(
        "persona_chat.py", ["--model_name_or_path", folder, "--stdin", "--no_sample", "--max_new_tokens", "12",
        *[a for s in PERSONA for a in ("--persona", s)]], HISTORY[0] + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == " ".join(plain_tok.decode(ours, skip_special_tokens=True).split())


@pytest.mark.slow
def test_persona_eval_uses_the_template(trained, data_path, tmp_path):
    from persona_eval import EvalArguments, main

    results = main(
        EvalArguments(
            model_name_or_path=trained["qwen2"],
            dataset_path=data_path,
            max_turns=6,
            output_file=str(tmp_path / "eval.json"),
            dataset_cache=str(tmp_path / "cache"),
            save_predictions=True,
        )
    )
    metrics = results["metrics"]
    assert metrics["turns"] == 6 and 0 <= metrics["hits@1"] <= 1 and metrics["ppl"] > 1 and "f1" in metrics
    # Word-level perplexity on chat rows: the reply's NLL without the end-of-turn token, per ParlAI word.
    assert metrics["ppl_word"] > 1 and metrics["gold_reply_words"] > 0 and "repeat_self_gold" in metrics
    assert metrics["candidates_per_turn"] == [20]

    # The first turn's reply, independently: the plain causal LM on the tokenizer's own template, greedy, 20 tokens.
    dialog = load_dialogs(data_path)["valid"][0]
    plain = AutoModelForCausalLM.from_pretrained(trained["qwen2"]).eval()
    plain_tok = AutoTokenizer.from_pretrained(trained["qwen2"])
    messages = reference_messages(
        dialog["personality"], dialog["utterances"][0]["history"], system_prompt=SYSTEM_PROMPT
    )
    prompt = chat_ids(plain_tok, messages, add_generation_prompt=True)
    with torch.no_grad():
        output = plain.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20)[0, len(prompt) :]
    expected = plain_tok.decode(output, skip_special_tokens=True)
    assert expected.strip() and " ".join(results["predictions"][0]["reply"].split()) == " ".join(expected.split())


@pytest.mark.slow
def test_lora_on_chat_rows_trains_saves_loads(instruct_checkpoints, data_path, tmp_path):
    from run_persona import cli

    out = tmp_path / "lora"
    assert cli(train_args(instruct_checkpoints["qwen2"], data_path, out, "--use_peft", "true", steps=12)) == 0
    assert (out / "adapter_config.json").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert not adapter.get("trainable_token_indices")  # no persona tokens to train
    model, tokenizer = load_model_and_tokenizer(str(out))
    assert type(model) is PersonaDoubleHeadsModel and input_format_of(tokenizer).kind == "chat_template"
    assert model.get_input_embeddings().num_embeddings == len(
        AutoTokenizer.from_pretrained(instruct_checkpoints["qwen2"])
    )
    base, _ = load_model_and_tokenizer(instruct_checkpoints["qwen2"])
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert any("multiple_choice_head" in n for n in changed) and any("self_attn" in n for n in changed)


@pytest.mark.slow
def test_transformers_serve_gives_persona_chats_reply(trained, tmp_path):
    pytest.importorskip("openai", reason="transformers serve needs the serve extra: pip install -e '.[serve]'")
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip("transformers serve needs the serve extra: pip install -e '.[serve]'")
    folder = trained["qwen2"]
    model, tokenizer = load_model_and_tokenizer(folder)
    (ours,) = generate_reply_ids(model.eval(), tokenizer, [(PERSONA, HISTORY)], no_sample=True, max_new_tokens=12)
    expected = tokenizer.decode(ours, skip_special_tokens=True).strip()
    assert expected

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [shutil.which("transformers") or "transformers", "serve", folder, "--host", "127.0.0.1", "--port",
               str(port), "--device", "cpu"]  # fmt: skip
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        body = {
            "model": folder,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT.replace("{persona}", "\n".join(PERSONA))},
                {"role": "user", "content": HISTORY[0]},
            ],
            "temperature": 0,
            "max_tokens": 12,
        }
        reply = None
        deadline = time.monotonic() + 120
        while reply is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    data=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=60) as response:
                    reply = json.load(response)
            except (ConnectionError, urllib.error.URLError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not answer: {(tmp_path / 'serve.log').read_text()[-2000:]}")
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert reply["choices"][0]["message"]["content"].strip() == expected


def test_cli_errors_are_one_line(instruct_checkpoints, tiny_checkpoint, data_path, tmp_path, capsys):
    from run_persona import cli

    bare = tmp_path / "bare"
    shutil.copytree(instruct_checkpoints["qwen2"], bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        if (bare / name).exists():
            (bare / name).unlink()
    line = error_line(cli, train_args(str(bare), data_path, tmp_path / "o1", "--input_format", "chat_template"), capsys)
    assert str(bare) in line and "--input_format speaker_tokens" in line and "--chat_template FILE" in line

    think = tmp_path / "think.jinja"
    think.write_text(NON_PREFIX_TEMPLATE)
    line = error_line(cli, train_args(str(bare), data_path, tmp_path / "o2", "--chat_template", str(think)), capsys)
    assert f"--chat_template {think} renders the assistant's reply differently" in line

    line = error_line(cli, train_args(tiny_checkpoint, data_path, tmp_path / "o3", "--system_prompt", "hi"), capsys)
    assert "--system_prompt must contain {persona}" in line


@pytest.mark.slow
def test_chat_template_file_is_saved_with_the_model(instruct_checkpoints, data_path, tmp_path):
    """A template given by file replaces the tokenizer's own, and the trained folder carries it."""
    from run_persona import cli

    template = tmp_path / "llama3.jinja"
    template.write_text(LLAMA3_TEMPLATE)
    # The Llama-3 tokens are not in the ChatML tokenizer: a ChatML checkpoint with Llama 3's template would not have
    # an end-of-turn token, so this uses the Llama checkpoint with its own template given again as a file.
    out = tmp_path / "run"
    assert (
        cli(train_args(instruct_checkpoints["llama"], data_path, out, "--chat_template", str(template), steps=2)) == 0
    )
    assert AutoTokenizer.from_pretrained(out).chat_template == LLAMA3_TEMPLATE


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-0.5b-instruct", "smollm2-360m-instruct"])
@pytest.mark.parametrize("lora", [False, True])
def test_instruct_configs_train_one_step(instruct_checkpoints, data_path, tmp_path, name, lora):
    """The recipes as written, the tiny backbone and data swapped in (and the LoRA flags of their comments)."""
    from run_persona import cli

    family = "qwen2" if name.startswith("qwen") else "llama"
    config = os.path.join(ROOT, "configs", f"{name}.yaml")
    out = tmp_path / "run"
    flags = ["--use_peft", "true", "--learning_rate", "2.0e-4"] if lora else []
    assert cli([
        config, "--model_name_or_path", instruct_checkpoints[family], "--dataset_path", data_path,
        "--dataset_cache", str(tmp_path / "cache"), "--output_dir", str(out), "--max_steps", "1",
        "--gradient_accumulation_steps", "1", "--max_eval_samples", "2", "--use_cpu", "true", "--report_to", "none",
        *flags,
    ]) == 0  # fmt: skip
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    assert json.loads((out / "tokenizer_config.json").read_text())["persona_input_format"]["input_format"] == (
        "chat_template"
    )


def test_chat_rows_cut_to_max_length_are_counted(tokenizers, data_path, caplog):
    tok = tokenizers["chatml"]
    fmt = ChatFormat.from_tokenizer(tok)
    dialogs = load_dialogs(data_path)["train"].select(range(2))
    whole = build_features(dialogs, tok, num_candidates=3, max_history=2, input_format=fmt)
    max_length = sorted(max(map(len, r)) for r in whole["input_ids"])[len(whole) // 2]
    with caplog.at_level("WARNING", logger="persona_data"):
        rows = build_features(dialogs, tok, num_candidates=3, max_history=2, max_length=max_length, input_format=fmt)
    longer = sum(max(map(len, r)) > max_length for r in whole["input_ids"])
    assert longer and all(max(map(len, r)) <= max_length for r in rows["input_ids"])
    assert f"{longer} of {len(rows)} rows lost their oldest history turns or persona sentences" in caplog.text


@pytest.fixture(scope="module")
def qwen2_step(instruct_checkpoints, data_path, tmp_path_factory) -> dict:
    """The tiny Qwen2 instruct checkpoint without dropout (the multiple-choice head's included, through the head
    settings a persona checkpoint stores in config.json) and its one-step update by a single process without DeepSpeed,
    so that 2-process ZeRO runs can be compared with it."""
    from helpers import STEP_ARGS, launch

    root = tmp_path_factory.mktemp("zero-chat")
    checkpoint = root / "qwen2"
    shutil.copytree(instruct_checkpoints["qwen2"], checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["persona_double_heads"] = {"summary_first_dropout": 0.0}
    (checkpoint / "config.json").write_text(json.dumps(config))
    single = root / "single"
    launch(train_args(str(checkpoint), data_path, single, *STEP_ARGS, "--gradient_accumulation_steps", "4"))
    init, expected = torch.load(single / "weights_init_rank0.pt"), torch.load(single / "weights_final_rank0.pt")
    assert max(float((expected[k] - init[k]).abs().max()) for k in init) > 1e-3  # a step the tests can tell apart
    return {"checkpoint": str(checkpoint), "init": init, "expected": expected}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_on_chat_rows_same_update_and_loadable(qwen2_step, data_path, tmp_path, stage):
    """2 processes under DeepSpeed ZeRO (CPU, gloo) take the single-process step over the same global batch of 8
    chat-template rows, and the saved folder loads as a plain causal LM and as a persona model with its format."""
    pytest.importorskip("deepspeed")
    from helpers import STEP_ARGS, assert_same_weights, launch

    out = tmp_path / stage
    config = os.path.join(ROOT, "configs", "deepspeed", f"{stage}.json")
    args = [*STEP_ARGS, "--gradient_accumulation_steps", "2", "--deepspeed", config]
    launch(train_args(qwen2_step["checkpoint"], data_path, out, *args), nproc=2)
    if stage == "zero2":  # ZeRO-3's parameters are partitioned: the probe dumps none, the saved model is checked
        assert_same_weights(torch.load(out / "weights_init_rank1.pt"), qwen2_step["init"], atol=0)
        assert_same_weights(torch.load(out / "weights_final_rank0.pt"), torch.load(out / "weights_final_rank1.pt"))
    model, tokenizer = load_model_and_tokenizer(str(out))
    assert type(model) is PersonaDoubleHeadsModel and input_format_of(tokenizer).kind == "chat_template"
    assert_same_weights(model.state_dict(), qwen2_step["expected"])
    causal = AutoModelForCausalLM.from_pretrained(out)
    backbone = {k: v for k, v in qwen2_step["expected"].items() if not k.startswith("multiple_choice_head")}
    assert_same_weights(causal.state_dict(), backbone)  # the same names: the heads sit beside the backbone's modules


def test_readme_instruct_snippet_builds_chat_template_rows(instruct_checkpoints, data_path, tmp_path, monkeypatch):
    """The README's instruct snippet as written (a tiny checkpoint swapped in): rows follow the recorded chat
    template without `chat_format`, exactly as with it, where before they failed asking for speaker tokens."""
    import re

    from persona_data import build_features, load_dialogs

    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8").read()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "Instruct" in b]
    code = snippet.replace('"Qwen/Qwen2.5-0.5B-Instruct"', repr(instruct_checkpoints["qwen2"]))
    code = code.replace('"personachat_self_original.json"', repr(data_path))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    train, tokenizer = namespace["train"], namespace["tokenizer"]
    assert "token_type_ids" not in train.column_names and "<speaker1>" not in tokenizer.get_vocab()
    explicit = build_features(
        load_dialogs(data_path)["train"],
        tokenizer,
        num_candidates=2,
        max_history=2,
        input_format=input_format_of(tokenizer),
    )
    assert train["input_ids"] == explicit["input_ids"] and train["labels"] == explicit["labels"]
