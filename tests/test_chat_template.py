"""persona_chat_template: chat-template rows checked against independent apply_chat_template calls and full logits."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DROPS_SYSTEM_TEMPLATE,
    END_OF_TURN,
    NON_PREFIX_TEMPLATE,
    QWEN25_TEMPLATE,
    backbone_config,
    chat_ids,
    reference_messages,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from persona_chat_options import load_chat_template
from persona_chat_template import ChatFormat
from persona_errors import ChatTemplateError


def examples(dialogs, count=6):
    """(persona, history, candidates) of the first `count` utterances with 4 candidates, two with the bot speaking
    first, and one with all 20 candidates (evaluation)."""
    found = [(d["personality"], u["history"], u["candidates"]) for d in dialogs for u in d["utterances"]]
    return [(p, h, c[-4:]) for p, h, c in found[:count]] + [(p, h[1:], c[-4:]) for p, h, c in found[:2]] + found[-1:]


def test_chatml_row_literal(tokenizers):
    fmt = ChatFormat.from_tokenizer(tokenizers["chatml"])
    rows, cut = fmt.build_rows(["i like tea.", "i am a nurse."], ["hello , how are you ?"], ["no way", "fine , thanks"])
    tok = tokenizers["chatml"]
    expected = (
        "<|im_start|>system\nYou are chatting with someone. Stay in character. Your persona:\ni like tea.\n"
        "i am a nurse.<|im_end|>\n<|im_start|>user\nhello , how are you ?<|im_end|>\n<|im_start|>assistant\n"
        "fine , thanks<|im_end|>\n"
    )
    assert tok.decode(rows["input_ids"][1]) == expected and not cut
    gold_labels = [t for t in rows["labels"][1] if t != -100]
    assert tok.decode(gold_labels) == "fine , thanks<|im_end|>"
    # The "\n" after <|im_end|> is in the row, unlabelled; the MC head reads <|im_end|>.
    assert rows["labels"][1][-1] == -100 and rows["input_ids"][1][-1] == tok.encode("\n", add_special_tokens=False)[0]
    assert [rows["input_ids"][i][rows["mc_token_ids"][i]] for i in range(2)] == [
        tok.convert_tokens_to_ids("<|im_end|>")
    ] * 2
    assert rows["labels"][0] == [-100] * len(rows["input_ids"][0]) and rows["mc_labels"] == 1


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_rows_equal_apply_chat_template(tokenizers, dialogs, family):
    tok = tokenizers[family]
    fmt = ChatFormat.from_tokenizer(tok)
    end_of_turn = tok.convert_tokens_to_ids(END_OF_TURN[family])
    assert fmt.system_role and fmt.end_of_turn_ids == [end_of_turn]
    for persona, history, candidates in examples(dialogs):
        rows, cut = fmt.build_rows(persona, history, candidates)
        assert not cut and rows["mc_labels"] == len(candidates) - 1
        prompt = chat_ids(tok, reference_messages(persona, history), add_generation_prompt=True)
        assert fmt.context_ids(persona, history) == prompt
        for i, candidate in enumerate(candidates):
            full = chat_ids(tok, reference_messages(persona, history, candidate))
            assert rows["input_ids"][i] == full
            assert full[rows["mc_token_ids"][i]] == end_of_turn
            assert full[rows["mc_token_ids"][i] + 1 :] == tok.encode("\n", add_special_tokens=False) * (
                family == "chatml"
            )
        # Labels: exactly the gold reply's tokens and the end-of-turn, right after the generation prompt.
        gold_ids = tok(candidates[-1], add_special_tokens=False)["input_ids"]
        labels = rows["labels"][-1]
        span = slice(len(prompt), len(prompt) + len(gold_ids) + 1)
        assert labels[span] == gold_ids + [end_of_turn]
        assert set(labels[: span.start] + labels[span.stop :]) == {-100}
        assert all(set(row) == {-100} for row in rows["labels"][:-1])


def test_system_less_template_puts_persona_in_first_user_turn(tokenizers, dialogs, caplog):
    tok = tokenizers["gemma"]
    with caplog.at_level(logging.WARNING, logger="persona_chat_template"):
        fmt = ChatFormat.from_tokenizer(tok)
        ChatFormat.from_tokenizer(tok)  # says it once
    assert not fmt.system_role
    assert [r.getMessage() for r in caplog.records] == [
        f"The chat template of {tok.name_or_path} has no system role: the persona goes at the head of the first user "
        "turn."
    ]
    for persona, history, candidates in examples(dialogs):
        system, *turns = reference_messages(persona, history, candidates[-1])
        if turns[0]["role"] == "user":
            turns[0] = {"role": "user", "content": system["content"] + "\n\n" + turns[0]["content"]}
        else:  # the bot spoke first: the persona is a user turn of its own
            turns.insert(0, {"role": "user", "content": system["content"]})
        rows, _ = fmt.build_rows(persona, history, candidates)
        assert rows["input_ids"][-1] == chat_ids(tok, turns)
        assert tok.decode([t for t in rows["labels"][-1] if t != -100]) == candidates[-1] + "<end_of_turn>"
    assert fmt.end_of_turn_ids == [tok.convert_tokens_to_ids("<end_of_turn>")]


def test_template_that_drops_the_system_message_is_detected(tokenizers):
    fmt = ChatFormat.from_tokenizer(
        tokenizers["chatml"], chat_template=DROPS_SYSTEM_TEMPLATE, template_name="drop.jinja"
    )
    assert not fmt.system_role
    assert fmt.messages(["i like tea."], ["hi"]) == [
        {"role": "user", "content": fmt.system_text(["i like tea."]) + "\n\nhi"}
    ]


def test_custom_system_prompt(tokenizers):
    fmt = ChatFormat.from_tokenizer(tokenizers["chatml"], system_prompt="Be {persona} Thanks.")
    assert fmt.messages(["a.", "b."], ["hi"])[0] == {"role": "system", "content": "Be a.\nb. Thanks."}
    with pytest.raises(ValueError, match=r"--system_prompt must contain \{persona\}"):
        ChatFormat.from_tokenizer(tokenizers["chatml"], system_prompt="You are a bot.")


def test_tokenizer_without_chat_template(tokenizers, tmp_path):
    tok = tokenizers["chatml"]
    tok.save_pretrained(tmp_path)
    bare = AutoTokenizer.from_pretrained(tmp_path)
    bare.chat_template = None
    with pytest.raises(ChatTemplateError) as err:
        ChatFormat.from_tokenizer(bare)
    message = str(err.value)
    assert str(tmp_path) in message and "--input_format speaker_tokens" in message and "--chat_template FILE" in message
    # A template file gives it one.
    (tmp_path / "chatml.jinja").write_text(QWEN25_TEMPLATE)
    (tmp_path / "tc.json").write_text(json.dumps({"chat_template": QWEN25_TEMPLATE}))
    for name in ("chatml.jinja", "tc.json"):
        template = load_chat_template(str(tmp_path / name))
        assert template == QWEN25_TEMPLATE
        fmt = ChatFormat.from_tokenizer(bare, chat_template=template)
        assert fmt.build_rows(["i like tea."], ["hi"], ["hello"])[0]["input_ids"][0] == chat_ids(
            tok, reference_messages(["i like tea."], ["hi"], "hello")
        )
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ChatTemplateError, match="empty.json: the file holds no chat template"):
        load_chat_template(str(tmp_path / "empty.json"))
    with pytest.raises(ChatTemplateError, match="missing.jinja: no such file"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_non_prefix_template_raises(tokenizers):
    # Found when the format is built, before any data is read.
    with pytest.raises(ChatTemplateError, match="think.jinja renders the assistant's reply differently"):
        ChatFormat.from_tokenizer(tokenizers["chatml"], chat_template=NON_PREFIX_TEMPLATE, template_name="think.jinja")


def test_tokens_merging_across_the_generation_prompt_raise(tokenizers):
    tok = tokenizers["llama3-gpt2-pretokenizer"]
    # Precondition: alone, the prompt's final "\n\n" is one token; before a word it is two.
    assert len(tok.encode("\n\n", add_special_tokens=False)) == 1
    assert len(tok.encode("\n\nhello", add_special_tokens=False)) == 3
    with pytest.raises(ChatTemplateError, match="merges across the end of the generation prompt"):
        ChatFormat.from_tokenizer(tok)


def reference_cut(tok, persona, history, reply, max_length):
    """The context rule written out plainly for chat rows: one turn, sentence or token at a time, the whole row rendered
    and tokenized again after each (quadratic). Returns the persona and history that are kept."""
    persona, history = list(persona), list(history)

    def fits():
        return len(chat_ids(tok, reference_messages(persona, history, reply))) <= max_length

    while not fits() and len(history) > 1:  # 1. the oldest turns
        history.pop(0)
    tokens = lambda: sum(len(tok.encode(p, add_special_tokens=False)) for p in persona)  # noqa: E731
    while not fits() and persona and tokens() > max_length // 2:  # 2. the persona over half the window
        persona.pop()
    last = tok.encode(history[-1], add_special_tokens=False)
    keep = len(last)
    while not fits() and keep:  # 3. the last turn's oldest tokens
        keep -= 1
        history[-1] = tok.decode(last[len(last) - keep :], clean_up_tokenization_spaces=False) if keep else ""
    while not fits() and persona:  # 4. the rest of the persona
        persona.pop()
    return persona, history


def test_truncation_follows_the_one_context_rule(tokenizers, dialogs):
    tok = tokenizers["chatml"]
    fmt = ChatFormat.from_tokenizer(tok)
    persona, history, candidates = dialogs[0]["personality"], dialogs[0]["utterances"][3]["history"], ["ok", "fine"]
    assert len(history) == 7

    def row_length(p, h, reply="fine"):
        return len(chat_ids(tok, reference_messages(p, h, reply)))

    # Oldest history turns go first, the last one stays.
    max_length = row_length(persona, history[-3:])
    rows, cut = fmt.build_rows(persona, history, candidates, max_length=max_length)
    assert cut and rows["input_ids"][1] == chat_ids(tok, reference_messages(persona, history[-3:], "fine"))
    # Every window from the smallest that holds a row to the whole one: what is kept is the plain rule's.
    smallest = row_length([], [""])
    checked = set()
    for max_length in range(smallest, row_length(persona, history) + 1):
        rows, cut = fmt.build_rows(persona, history, candidates, max_length=max_length)
        kept = reference_cut(tok, persona, history, "fine", max_length)
        assert rows["input_ids"][1] == chat_ids(tok, reference_messages(*kept, "fine")), max_length
        assert max(map(len, rows["input_ids"])) <= max_length
        checked.add((len(kept[0]), len(kept[1]), kept[1][-1] == history[-1]))
    # The windows reached every step: fewer turns, fewer sentences, a shortened last turn.
    assert {k[1] for k in checked} >= {1, 3, 7} and {k[0] for k in checked} >= {0, len(persona)}
    assert any(not whole for _, _, whole in checked)
    # Then the reply: the replies lose their last tokens once the context holds nothing more to cut.
    long_reply = "i could eat pizza every day , it relaxes me ."
    max_length = row_length([], [""]) - 2
    rows, cut = fmt.build_rows(persona, history, ["ok", long_reply], max_length=max_length)
    assert cut and max(map(len, rows["input_ids"])) <= max_length
    labelled = tok.decode([t for t in rows["labels"][1] if t != -100])
    assert labelled.endswith("<|im_end|>") and long_reply.startswith(labelled.removesuffix("<|im_end|>"))
    assert len(labelled) < len(long_reply)
    with pytest.raises(ValueError, match="max_length=5 is too small"):
        fmt.build_rows(persona, history, candidates, max_length=5)
    with pytest.raises(ValueError, match="lower --max_new_tokens"):
        fmt.context_ids(persona, history, max_length=20, reply_budget=18)


def test_a_long_persona_is_fitted_in_few_renderings(tokenizers, monkeypatch):
    """Fitting renders the prompt O(log n) times, not once per dropped sentence."""
    fmt = ChatFormat.from_tokenizer(tokenizers["chatml"])
    persona = [f"i have a pet number {i} ." for i in range(2000)]
    calls = []
    render = ChatFormat.render
    monkeypatch.setattr(ChatFormat, "render", lambda self, *a, **k: calls.append(1) or render(self, *a, **k))
    ids = fmt.context_ids(persona, ["hello , how are you ?"], max_length=256, reply_budget=20)
    assert len(ids) + 20 <= 256 and len(calls) < 60, len(calls)


@pytest.mark.parametrize("family,model_family", [("chatml", "qwen2"), ("llama3", "llama")])
def test_lm_loss_equals_full_logits_cross_entropy(tokenizers, dialogs, family, model_family):
    tok = tokenizers[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(backbone_config(model_family, len(tok))).eval()
    fmt = ChatFormat.from_tokenizer(tok)
    persona, history, candidates = examples(dialogs)[1]
    rows, _ = fmt.build_rows(persona, history, candidates)
    input_ids, labels = torch.tensor([rows["input_ids"][-1]]), torch.tensor([rows["labels"][-1]])
    with torch.no_grad():
        loss = model(input_ids=input_ids, labels=labels).loss
        # Independently: the assistant reply and its end-of-turn follow the rendered generation prompt.
        prompt = chat_ids(tok, reference_messages(persona, history), add_generation_prompt=True)
        full = chat_ids(tok, reference_messages(persona, history, candidates[-1]))
        targets = tok(candidates[-1], add_special_tokens=False)["input_ids"] + [
            tok.convert_tokens_to_ids(END_OF_TURN[family])
        ]
        logits = model(input_ids=torch.tensor([full])).logits[0]  # [T, V]
        start = len(prompt)
        expected = F.cross_entropy(logits[start - 1 : start - 1 + len(targets)], torch.tensor(targets))
    torch.testing.assert_close(loss, expected)
