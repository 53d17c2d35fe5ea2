"""Self-chat: the probe rule on worked examples, curves that a scripted partner, a scripted bot and a stub NLI move by
hand-computed amounts, conversations regenerated from their own saved turns, seeds, both input formats, two processes
against one, the README command and the bad inputs."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys

import pytest
from helpers import error_line, stub_scorer

import persona_selfchat
from persona_generation import generate_replies
from persona_probes import (
    MAX_SELF_CHAT_TURNS,
    agrees_with_answer,
    agrees_with_persona,
    check_turns,
    probe_for,
    question_for,
    read_probe_file,
)
from persona_selfchat import drift_summary, plot_drift, self_chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "sentence, question, keys",
    [
        ("i love cats.", "what do you love?", ("cats",)),
        ("I have two dogs!", "what do you have?", ("two", "dogs")),
        ("my favorite color is blue.", "what is your favorite color?", ("blue",)),
        ("my parents were farmers .", "what were your parents?", ("farmers",)),
        ("i'm a nurse.", "what are you?", ("nurse",)),
        ("i was a teacher.", "what were you?", ("teacher",)),
        ("i can play the guitar.", "what can you do?", ("play", "guitar")),
        ("i like to ski.", "what do you like to do?", ("ski",)),
        ("i live in paris.", "where do you live?", ("paris",)),
        ("i work as a nurse.", "what do you work as?", ("nurse",)),
        ("i had a cat named tom.", "what did you have?", ("cat", "named", "tom")),
    ],
)
def test_probe_rule_worked_examples(sentence, question, keys):
    probe = probe_for([sentence])
    assert (probe.question, probe.key_words, probe.fact, probe.sentence) == (question, keys, sentence, 0)


@pytest.mark.parametrize(
    "sentence",
    ["i do not like cats.", "i don't eat meat.", "i never sleep.", "i worked at a bank.", "cats are great.", "i am"],
)
def test_sentences_the_rule_does_not_cover(sentence):
    assert question_for(sentence) is None
    # The probed fact is the first sentence the rule covers.
    assert probe_for([sentence, "i love dogs."]).sentence == 1


def test_probe_agreement_by_key_words():
    probe = probe_for(["i have two dogs."])
    assert agrees_with_persona("yes, two dogs!", probe)
    assert not agrees_with_persona("two cats", probe)  # "dogs" missing
    assert not agrees_with_persona("i don't have two dogs", probe)  # negated ("don t")
    assert agrees_with_answer("Two dogs.", "i have two dogs at home", probe)  # the same claim
    assert not agrees_with_answer("no dogs", "i have dogs", probe)  # negation differs
    assert not agrees_with_answer("dogs", "two dogs", probe)  # key words differ
    assert agrees_with_answer("hello", "i like pizza", probe)  # both say nothing about the fact


PERSONAS = [["i love cats.", "i am a nurse."], ["i love cats.", "i am a pilot."], ["i love cats.", "i am a teacher."]]
FLIP = {"nurse": 5, "pilot": 5, "teacher": 7}  # the turn at which each conversation's bot turns against its persona


def scripted_bot(model, tokenizer, contexts, **options):
    """A bot whose reply at turn t is fixed: it loves cats, then from its flip turn on does not."""
    replies = []
    for persona, history in contexts:
        t = (len(history) + 1) // 2
        flip = next(turn for job, turn in FLIP.items() if job in persona[1])
        replies.append(f"i love cats number {t}" if t < flip else f"no cats for me now number {t}")
    return replies


def judge(reply, premise):
    if "no" in reply.split() and "love" in premise:
        return "contradiction"
    return "entailment" if "love" in reply and "love" in premise else "neutral"


def curve(result, metric):
    c = result["curves"][metric]
    return dict(zip(c["turns"], c["mean"]))


def test_scripted_partner_and_stub_nli_move_the_curves_exactly(monkeypatch):
    seen = []

    def bot(model, tokenizer, contexts, **options):
        seen.append((contexts, options["own_turns"]))
        return scripted_bot(model, tokenizer, contexts)

    monkeypatch.setattr(persona_selfchat, "generate_replies", bot)
    scripts = [[f"partner {k} line {t}" for t in range(1, 9)] for k in range(3)]
    result = self_chat(
        None, None, PERSONAS, turns=8, partner="scripted", scripts=scripts, probe_turns=(2, 6, 8),
        nli=stub_scorer(judge), batch_size=2, progress=False, no_sample=True,
    )  # fmt: skip
    first = result["conversations"][0]
    texts = [(turn["speaker"], turn["text"]) for turn in first["turns"]]
    probe = "what do you love?"
    expected = []
    for t in range(1, 9):
        expected += [("partner", probe if t in (2, 6, 8) else f"partner 0 line {t}"), ("bot", scripted_bot(
            None, None, [(PERSONAS[0], [""] * (2 * t - 1))])[0])]  # fmt: skip
    assert texts == expected
    # The bot answered its own conversation: its context at turn t is every turn before, its replies counted as its own.
    contexts, own = seen[-1]  # the last call: conversation 2's turn 8, alone in its batch
    assert contexts == [(PERSONAS[2], [text for _, text in texts_of(result, 2)[:15]])]
    assert own == [[text for speaker, text in texts_of(result, 2)[:15] if speaker == "bot"]]

    # Flips at 5, 5, 7 of 3 conversations: the persona is contradicted by 0 before 5, 2/3 at 5-6, all from 7.
    contradiction = {t: (0.0 if t < 5 else 2 / 3 if t < 7 else 1.0) for t in range(1, 9)}
    assert curve(result, "persona_contradiction") == pytest.approx(contradiction)
    assert curve(result, "persona_entailment") == pytest.approx({t: 1 - v for t, v in contradiction.items()})
    assert curve(result, "c_score") == pytest.approx({t: 1 - 2 * v for t, v in contradiction.items()})
    # Copying "i love cats" until the flip; a 3-gram of an earlier own turn from the 2nd turn, save at the flip.
    assert curve(result, "persona_copy") == pytest.approx({t: 1 - v for t, v in contradiction.items()})
    flips = [FLIP[persona[1].split()[-1].rstrip(".")] for persona in PERSONAS]
    repeat = {t: statistics.mean(float(t > 1 and t != f) for f in flips) for t in range(1, 9)}
    assert curve(result, "repeat_self") == pytest.approx(repeat)
    # Turn t after the flip f contradicts the f - 1 turns before it, of t - 1: (f - 1) / (t - 1); none on turn 1.
    rates = [[0.0 if t < f else (f - 1) / (t - 1) for t in range(2, 9)] for f in (5, 5, 7)]
    assert curve(result, "self_contradiction_rate") == pytest.approx(
        {t: statistics.mean(r[t - 2] for r in rates) for t in range(2, 9)}
    )
    # Probes at 2, 6, 8: answer 2 loves cats (agrees), 6 and 8 say "no cats" except conversation 2 at 6.
    assert curve(result, "probe_agreement_persona") == pytest.approx({2: 1.0, 6: 1 / 3, 8: 0.0})
    assert curve(result, "probe_agreement_first") == pytest.approx({6: 1 / 3, 8: 0.0})
    assert curve(result, "probe_agreement_persona_nli") == pytest.approx({2: 1.0, 6: 1 / 3, 8: 0.0})
    assert curve(result, "probe_agreement_first_nli") == pytest.approx({6: 1 / 3, 8: 0.0})

    # Intervals: mean +- 1.96 sample standard errors; the summary's slope is least squares over the curve.
    c = result["curves"]["persona_contradiction"]
    half = 1.959964 * statistics.stdev([1.0, 1.0, 0.0]) / math.sqrt(3)
    assert (c["ci_low"][4], c["ci_high"][4], c["n"][4]) == pytest.approx((2 / 3 - half, 2 / 3 + half, 3))
    assert c["ci_low"][0] == c["ci_high"][0] == 0.0
    xs, ys = list(range(1, 9)), [contradiction[t] for t in range(1, 9)]
    slope = sum((x - 4.5) * (y - statistics.mean(ys)) for x, y in zip(xs, ys)) / sum((x - 4.5) ** 2 for x in xs)
    summary = result["summary"]["persona_contradiction"]
    assert summary == pytest.approx({"mean": statistics.mean(ys), "slope": slope, "last": 1.0, "last_turn": 8})
    assert result["summary"]["probe_agreement_first"] == pytest.approx(
        {"mean": 1 / 6, "slope": -1 / 6, "last": 0.0, "last_turn": 8}
    )
    assert drift_summary({"x": {"turns": [3], "mean": [0.5], "n": [2]}})["x"]["slope"] is None
    # Per-turn scores are saved with the conversation.
    assert first["scores"][5] == pytest.approx({
        "turn": 6, "persona_copy": 0.0, "repeat_self": 1.0, "c_score": -1.0, "persona_entailment": 0.0,
        "persona_contradiction": 1.0, "self_contradiction_rate": 4 / 5, "probe_agreement_persona": 0.0,
        "probe_agreement_first": 0.0, "probe_agreement_persona_nli": 0.0, "probe_agreement_first_nli": 0.0,
    })  # fmt: skip


def texts_of(result, k):
    return [(turn["speaker"], turn["text"]) for turn in result["conversations"][k]["turns"]]


def test_without_nli_only_the_text_metrics(monkeypatch):
    monkeypatch.setattr(persona_selfchat, "generate_replies", scripted_bot)
    result = self_chat(None, None, PERSONAS, turns=3, progress=False, no_sample=True)
    assert set(result["curves"]) == {"persona_copy", "repeat_self"}
    # A bot partner has the next persona and opens with the default line.
    first = result["conversations"][0]
    assert first["partner_persona"] == PERSONAS[1] and first["turns"][0]["text"] == persona_selfchat.DEFAULT_OPENING


def test_conversations_are_the_bots_own_and_do_not_depend_on_the_batch(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    model.eval()
    personas = [["i love cats.", "i am a nurse."], ["i live in paris."], ["my favorite color is red."]]
    options = {"no_sample": True, "max_new_tokens": 6, "max_history": 1}
    one = self_chat(model, tok, personas, turns=3, batch_size=1, probe_turns=(2,), progress=False, **options)
    three = self_chat(model, tok, personas, turns=3, batch_size=3, probe_turns=(2,), progress=False, **options)
    assert one["conversations"] == three["conversations"]
    for k, conversation in enumerate(one["conversations"]):
        turns = [turn["text"] for turn in conversation["turns"]]
        assert conversation["turns"][2]["text"] == probe_for(personas[k]).question
        for t in range(1, 4):  # regenerated from the saved turns: the bot's reply to its own conversation
            (reply,) = generate_replies(model, tok, [(personas[k], turns[: 2 * t - 1])], **options)
            assert turns[2 * t - 1] == reply
            if t != 1 and t != 2:  # the partner bot, with the next persona, answering the bot's last reply
                (said,) = generate_replies(model, tok, [(personas[(k + 1) % 3], turns[: 2 * t - 2])], **options)
                assert turns[2 * t - 2] == said


def test_sampled_self_chats_are_reproducible_under_a_seed(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    personas = [["i love cats."], ["i live in paris."], ["i have a dog."]]

    def run(seed, batch_size=8):
        return self_chat(
            model.eval(), tok, personas, turns=3, seed=seed, batch_size=batch_size, progress=False,
            no_sample=False, top_k=0, top_p=1.0, temperature=1.5, max_new_tokens=8,
        )["conversations"]  # fmt: skip

    first = run(7)
    assert run(7, batch_size=1) == first
    assert run(8) != first
    # Conversation i is seeded with seed + i: the same conversation alone, as the first of a run with seed + 1.
    alone = self_chat(
        model.eval(), tok, personas[1:] + personas[:1], turns=3, seed=8, progress=False,
        no_sample=False, top_k=0, top_p=1.0, temperature=1.5, max_new_tokens=8,
    )["conversations"][0]  # fmt: skip
    assert [t["text"] for t in alone["turns"]] == [t["text"] for t in first[1]["turns"]]


def test_plot_or_one_line_without_matplotlib(tmp_path, monkeypatch):
    curves = {"repeat_self": {"turns": [1, 2], "mean": [0.0, 0.5], "ci_low": [0.0, 0.1], "ci_high": [0.0, 0.9]}}
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_drift(curves, str(tmp_path / "none.png")) is False and not (tmp_path / "none.png").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert plot_drift(curves, str(tmp_path / "drift.png"))
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_file(tmp_path):
    personas = {0: ["i love cats.", "i am a nurse."], 3: ["i live in paris."]}
    path = tmp_path / "probes.jsonl"
    path.write_text(
        '{"persona": 0, "question": "what is your job?", "sentence": 1}\n\n'
        '{"persona": 3, "question": "do you live in paris?", "key_words": ["Paris"]}\n'
    )
    probes = read_probe_file(str(path), personas)
    assert (probes[0].fact, probes[0].key_words) == ("i am a nurse.", ("nurse",))
    assert (probes[3].question, probes[3].key_words, probes[3].sentence) == ("do you live in paris?", ("paris",), 0)
    path.write_text('{"persona": 0, "question": "do you love cats?"}\n')  # every key word in the question: all kept
    assert read_probe_file(str(path), personas)[0].key_words == ("love", "cats")


def cli_args(checkpoint, data, *extra):
    return ["--model_name_or_path", checkpoint, "--dataset_path", data, *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--self_chat", "0"], "--self_chat must be a number of turns between 1 and 200, got 0."),
        (["--self_chat", "-4"], "--self_chat must be a number of turns between 1 and 200, got -4."),
        (["--self_chat", "201"], "--self_chat must be a number of turns between 1 and 200, got 201."),
        (["--self_chat", "8", "--probe_turns", "2,9"], "--probe_turns: turn 9 is beyond the conversation's 8 turns"),
        (["--self_chat", "8", "--probe_turns", "2,x"], "--probe_turns '2,x': bot turns are whole numbers and commas"),
        (["--self_chat", "8", "--probe_turns", "2,2"], "--probe_turns: a turn is given twice (2,2)."),
        (["--probe_turns", "2"], "--probe_turns is an option of the self-chat; add --self_chat N (turns)."),
        (["--self_chat", "4", "--partner", "scripted", "--partner_model", "PARTNER"], "--partner_model is a partner"),
        (["--self_chat", "4", "--num_conversations", "9"], "--num_conversations 9: the split has 8 dialogs with a"),
        (["--self_chat", "4", "--probe_turns", "2", "--probe_file", "PROBES"], "line 2: unknown persona id 12;"),
        (["--self_chat", "4", "--num_conversations", "0"], "--num_conversations must be >= 1, got 0."),
    ],
)
def test_bad_inputs_are_one_line(extra, message, persona_checkpoint, personachat_json, tmp_path, capsys):
    from persona_eval import cli

    (tmp_path / "probes.jsonl").write_text('{"persona": 1, "question": "what?"}\n{"persona": 12, "question": "a?"}\n')
    extra = [e.replace("PARTNER", persona_checkpoint).replace("PROBES", str(tmp_path / "probes.jsonl")) for e in extra]
    args = cli_args(persona_checkpoint, personachat_json, *extra, "--output_file", str(tmp_path / "o.json"))
    assert message in error_line(cli, args, capsys)


def test_check_turns_bound():
    check_turns(MAX_SELF_CHAT_TURNS, (1, MAX_SELF_CHAT_TURNS))
    with pytest.raises(ValueError, match="between 1 and 200"):
        check_turns(True)


def run_eval(args, nproc=1):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(
        [*cmd, os.path.join(ROOT, "persona_eval.py"), *args], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_one_process_and_two_give_the_same_self_chats(
    tmp_path, persona_checkpoint, personachat_json, tiny_nli_checkpoints
):
    common = cli_args(persona_checkpoint, personachat_json, "--self_chat", "4", "--num_conversations", "5")
    common += ["--probe_turns", "1,3", "--batch_size", "2", "--max_new_tokens", "6"]
    common += ["--nli_model", tiny_nli_checkpoints["mnli-style"], "--nli_batch_size", "3"]
    one = run_eval([*common, "--output_file", str(tmp_path / "one.json")])
    run_eval([*common, "--output_file", str(tmp_path / "two.json")], nproc=2)
    results, results_two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert results["num_processes"] == 1 and results_two["num_processes"] == 2
    assert results_two["curves"] == results["curves"] and results_two["summary"] == results["summary"]
    lines = (tmp_path / "one.conversations.jsonl").read_text().splitlines()
    assert (tmp_path / "two.conversations.jsonl").read_text().splitlines() == lines and len(lines) == 5
    assert {"self_contradiction_rate", "c_score", "probe_agreement_first_nli"} <= set(results["summary"])
    assert "slope/turn" in one.stdout and ("Drift plot" in one.stdout)
    assert [json.loads(line)["id"] for line in lines] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_a_chat_template_bot_with_a_speaker_token_partner(
    tmp_path,
    persona_checkpoint,
    personachat_json,
    tokenizers,  # noqa: F811
):
    """Each side its own tokenizer and input format: an instruct (chat-template) bot, the GPT-2 partner."""
    from helpers import backbone_config
    from transformers import AutoModelForCausalLM

    from persona_formats import input_format_of
    from persona_model import load_model_and_tokenizer

    tok = tokenizers["chatml"]
    model = AutoModelForCausalLM.from_config(backbone_config("qwen2", len(tok)))
    bot = tmp_path / "instruct"
    model.save_pretrained(bot)
    tok.save_pretrained(bot)
    assert input_format_of(load_model_and_tokenizer(str(bot))[1]).kind == "chat_template"
    assert input_format_of(load_model_and_tokenizer(persona_checkpoint)[1]).kind == "speaker_tokens"
    out = tmp_path / "chat.json"
    args = cli_args(str(bot), personachat_json, "--self_chat", "3", "--num_conversations", "2", "--probe_turns", "2")
    run_eval([*args, "--partner_model", persona_checkpoint, "--max_new_tokens", "5", "--output_file", str(out)])
    report = json.loads(out.read_text())
    assert report["partner"] == persona_checkpoint and report["conversations"] == 2
    records = [json.loads(line) for line in open(report["conversations_file"], encoding="utf-8")]
    assert [len(r["turns"]) for r in records] == [6, 6] and records[0]["turns"][2]["probe"]


def readme_section() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return text.split("### Self-chat: does the persona last a whole conversation?")[1].split("\n## ")[0]


@pytest.mark.slow
def test_readme_self_chat_commands_run(persona_checkpoint, personachat_json, tiny_nli_checkpoints, tmp_path):
    commands, plot = re.findall(r"```bash\n(.*?)```", readme_section(), flags=re.S)
    swaps = {"runs/my-run": persona_checkpoint, "data.json": personachat_json}
    swaps["path/to/nli-checkpoint"] = tiny_nli_checkpoints["deberta-style"]
    lines = commands.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("persona-eval ") for line in lines)
    for k, line in enumerate(lines):
        for old, new in swaps.items():
            line = line.replace(old, new)
        run_eval([*shlex.split(line)[1:], "--output_file", str(tmp_path / f"{k}.json"), "--max_new_tokens", "4"])
        report = json.loads((tmp_path / f"{k}.json").read_text())
        assert report["self_chat_turns"] == 16 and report["conversations"] == 8
        assert "probe_agreement_first" in report["summary"]
    assert "self_contradiction_rate" in report["summary"]  # the second command has an NLI model

    # The plot's commands, as written, in a fresh folder.
    synthetic, evaluation = (shlex.split(line) for line in plot.strip().splitlines())
    assert synthetic[:2] == ["python", "persona_synthetic.py"] and evaluation[0] == "persona-eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for argv in ([sys.executable, os.path.join(ROOT, "persona_synthetic.py"), *synthetic[2:]],
                 [sys.executable, os.path.join(ROOT, "persona_eval.py"), *evaluation[1:]]):  # fmt: skip
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "docs" / "self_chat_drift.json").read_text())
    assert report["plot_file"] == "docs/self_chat_drift.png" and report["self_chat_turns"] == 16
    assert ("Drift plot: docs/self_chat_drift.png" in proc.stdout) == (tmp_path / report["plot_file"]).exists()
    assert os.path.exists(os.path.join(ROOT, "docs", "self_chat_drift.png"))  # the README's image


def test_the_model_card_carries_the_self_chat_summary(persona_checkpoint, personachat_json, tmp_path):
    """A self-chat saved in the run folder (its default place) gives the card one row per metric: mean, slope per
    turn and the value at the last turn, as the results JSON holds them; a folder without one gives no section."""
    from persona_card import persona_model_card, self_chat_summary
    from persona_trainer import PersonaTrainingArguments as TrainingArguments

    folder = tmp_path / "run"
    folder.mkdir()
    assert self_chat_summary(str(folder)) is None
    (folder / "self_chat_old.json").write_text('{"summary": ')  # cut short: passed over
    output = folder / "self_chat_valid.json"
    argv = ["--model_name_or_path", persona_checkpoint, "--dataset_path", personachat_json, "--self_chat", "4",
            "--num_conversations", "2", "--probe_turns", "2", "--max_new_tokens", "4"]  # fmt: skip
    run_eval([*argv, "--output_file", str(output)])
    report = json.loads(output.read_text())
    summary = self_chat_summary(str(folder))
    assert summary == {"turns": 4, "summary": report["summary"]}
    card = persona_model_card(
        model_id="me/bot", base_model="gpt2", dataset=None, recipe={}, args=TrainingArguments(output_dir=str(tmp_path)),
        metrics={}, self_chat=summary,
    )  # fmt: skip
    assert "## Persona over a conversation (self-chat)" in card and "`persona-eval --self_chat 4`" in card
    for name, row in report["summary"].items():
        mean, slope, last = (("—" if row[k] is None else format(row[k], spec))
                             for k, spec in (("mean", ".3f"), ("slope", "+.4f"), ("last", ".3f")))  # fmt: skip
        expected = f"| {name} | {mean} | {slope} | {last} (turn {row['last_turn']}) |"
        assert expected in card.splitlines()
    plain = persona_model_card(model_id="me/bot", base_model="gpt2", dataset=None, recipe={},
                               args=TrainingArguments(output_dir=str(tmp_path)), metrics={})  # fmt: skip
    assert "self-chat" not in plain
