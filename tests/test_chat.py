"""persona_chat: context = training builder, KV-cached generation = full re-encode, token types, CLI end to end."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import run_cli

import persona_chat
from persona_chat import PersonaBot
from persona_data import build_features
from persona_decoding import generation_config_from_options, stop_token_ids
from persona_generation import build_context, generate_replies, generate_reply_ids
from persona_records import dialogs_to_dataset_dict
from persona_tokens import SpecialTokenIds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERSONA = ["i love cats.", "i am a nurse.", "my favorite color is purple."]
HISTORY = ["hi , how are you ?", "good , i just got home from work .", "what do you do ?"]
# Different lengths and both history parities, so left padding and token types are exercised.
CONTEXTS = [
    (PERSONA, HISTORY),
    (PERSONA[:1], HISTORY[-1:]),
    ([], ["hello"]),
    (PERSONA[::-1], HISTORY + ["i am a chef .", "do you like cooking ?"]),
    (PERSONA, HISTORY[:2]),  # even history: the reply segment has the speaker2 type, as in training
]


@pytest.fixture(scope="module")
def model(tiny_model_and_tokenizer):
    return tiny_model_and_tokenizer[0].eval()


@pytest.fixture(scope="module")
def ids(tiny_model_and_tokenizer):
    return SpecialTokenIds.from_tokenizer(tiny_model_and_tokenizer[1])


def training_row(tokenizer, persona, history, reply, max_history):
    """The gold candidate's input row as the training pipeline builds it."""
    dialogs = dialogs_to_dataset_dict(
        {"train": [{"personality": persona, "utterances": [{"history": history, "candidates": ["x", reply]}]}]},
        source="test",
    )["train"]
    features = build_features(dialogs, tokenizer, num_candidates=2, max_history=max_history)
    return features[0]["input_ids"][-1], features[0]["token_type_ids"][-1]


@pytest.mark.parametrize("persona,history", CONTEXTS)
def test_context_equals_training_builder(tokenizer, ids, persona, history):
    reply = "i like reading ."
    input_ids, token_types = training_row(tokenizer, persona, history, reply, max_history=1)
    reply_len = len(tokenizer(reply, add_special_tokens=False)["input_ids"]) + 1  # + eos
    ctx = build_context(tokenizer, persona, history, max_history=1)
    assert ctx["input_ids"].tolist() == [input_ids[:-reply_len]]
    assert ctx["token_type_ids"].tolist() == [token_types[:-reply_len]]
    assert ctx["attention_mask"].tolist() == [[1] * len(input_ids[:-reply_len])]
    assert ctx["input_ids"][0, -1] == ids.speaker1  # the bot's reply prefix ends the context
    assert ctx["input_ids"][0, 0] == ids.bos


def test_context_keeps_last_turns(tokenizer, ids):
    history = [f"turn {i} ." for i in range(9)]
    ctx = build_context(tokenizer, [], history, max_history=2)
    kept = tokenizer.decode(ctx["input_ids"][0], skip_special_tokens=True)
    assert "turn 3" not in kept and all(f"turn {i}" in kept for i in range(4, 9))
    assert (ctx["input_ids"][0] == ids.speaker2).sum() + (ctx["input_ids"][0] == ids.speaker1).sum() == 5 + 1


def reference_greedy(model, tokenizer, persona, history, max_history, max_new_tokens, min_length):
    """The reference's decoding, hand-rolled: re-encode the whole context for every token, no cache, no padding."""
    specials = set(stop_token_ids(tokenizer))
    reply = []
    for step in range(max_new_tokens):
        ctx = build_context(tokenizer, persona, history, max_history)
        # The reply so far carries the reply segment's token type (that of its speaker prefix).
        input_ids = torch.cat([ctx["input_ids"], torch.tensor([reply], dtype=torch.long)], dim=1)
        token_types = torch.cat([ctx["token_type_ids"], ctx["token_type_ids"][:, -1:].repeat(1, len(reply))], dim=1)
        with torch.no_grad():
            logits = model(input_ids=input_ids, token_type_ids=token_types).logits[0, -1]
        if step < min_length:
            logits[sorted(specials)] = -float("inf")
        token = int(logits.argmax())
        if token in specials:
            break
        reply.append(token)
    return reply


@pytest.mark.parametrize("min_length", [1, 12])
def test_greedy_equals_full_reencode_and_does_not_depend_on_batching(model, tokenizer, min_length):
    options = {"no_sample": True, "max_new_tokens": 12, "min_length": min_length}
    expected = [reference_greedy(model, tokenizer, p, h, 2, 12, min_length) for p, h in CONTEXTS]
    batched = generate_reply_ids(model, tokenizer, CONTEXTS, batch_size=4, **options)
    one_by_one = [generate_reply_ids(model, tokenizer, [c], **options)[0] for c in CONTEXTS]
    assert batched == expected
    assert one_by_one == expected
    if min_length == 12:
        assert all(len(r) == 12 for r in expected)


def test_generated_tokens_carry_the_reply_segment_type(model, tokenizer, ids):
    """generate() repeats the last token type; the context ends with the reply prefix, so every new token gets it."""
    seen = []

    def record(module, args, kwargs):
        input_ids = args[0] if args else kwargs["input_ids"]
        seen.append((input_ids.clone(), kwargs["token_type_ids"].clone()))

    handle = model.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        contexts = [CONTEXTS[0], CONTEXTS[4]]  # odd history -> speaker1 type, even history -> speaker2 type
        replies = generate_reply_ids(model, tokenizer, contexts, no_sample=True, max_new_tokens=6, min_length=6)
    finally:
        handle.remove()
    prefill, steps = seen[0], seen[1:]
    assert len(steps) == 5 and all(s[0].shape == (2, 1) for s in steps)  # KV cache: one new token per step
    step_types = torch.cat([s[1] for s in steps], dim=1)  # [2, 5] types of generated tokens 1..5
    for row, ((persona, history), reply) in enumerate(zip(contexts, replies)):
        _, train_types = training_row(tokenizer, persona, history, tokenizer.decode(reply), max_history=2)
        reply_type = train_types[-1]  # the training builder's type for the reply segment
        assert step_types[row].tolist() == [reply_type] * 5
        assert prefill[1][row, -1] == reply_type
    assert step_types[0, 0] == ids.speaker1 and step_types[1, 0] == ids.speaker2


def force_token(model, token_id):
    """Make `token_id` have probability ~1 at every position (the reference's infinite-resampling case)."""

    def hook(module, args, output):
        output = output.clone()
        output[..., token_id] += 1e4
        return output

    return model.lm_head.register_forward_hook(hook)


@pytest.mark.parametrize(
    "options",
    [{"no_sample": True}, {"seed": 0}, {"no_sample": True, "num_beams": 3}, {"seed": 1, "top_k": 5, "top_p": 1.0}],
)
def test_min_length_forbids_every_special_token(model, tokenizer, ids, options):
    for special in (ids.eos, ids.speaker2, ids.pad):
        handle = force_token(model, special)
        try:
            replies = generate_reply_ids(model, tokenizer, CONTEXTS[:2], max_new_tokens=8, min_length=3, **options)
            empty = generate_reply_ids(model, tokenizer, CONTEXTS[:1], max_new_tokens=8, min_length=0, **options)
        finally:
            handle.remove()
        # Exactly min_length ordinary tokens, then the certain special token ends the reply.
        assert [len(r) for r in replies] == [3, 3]
        assert not set(stop_token_ids(tokenizer)) & set(sum(replies, []))
        assert empty == [[]]


def test_generation_config_maps_reference_options(tokenizer, ids):
    config = generation_config_from_options(tokenizer)
    assert (config.max_new_tokens, config.min_new_tokens, config.do_sample) == (20, 1, True)
    assert (config.temperature, config.top_k, config.top_p, config.num_beams) == (0.7, 0, 0.9, 1)
    assert {ids.bos, ids.eos, ids.speaker1, ids.speaker2, ids.pad} <= set(config.eos_token_id)
    assert config.pad_token_id == ids.pad
    greedy = generation_config_from_options(tokenizer, no_sample=True, num_beams=4, max_new_tokens=30, min_length=2)
    assert (greedy.do_sample, greedy.num_beams, greedy.max_new_tokens, greedy.min_new_tokens) == (False, 4, 30, 2)
    with pytest.raises(ValueError, match="min_length"):
        generation_config_from_options(tokenizer, min_length=5, max_new_tokens=3)
    with pytest.raises(TypeError, match="Unknown generation options"):
        generate_replies(None, tokenizer, CONTEXTS, topp=0.5)


def test_the_reply_budget_is_max_new_tokens(model, tokenizer):
    replies = generate_reply_ids(model, tokenizer, CONTEXTS[:1], no_sample=True, max_new_tokens=4, min_length=4)
    assert len(replies[0]) == 4
    with pytest.raises(TypeError, match="Unknown generation options"):
        generate_reply_ids(model, tokenizer, CONTEXTS[:1], max_length=4)
    parsed = persona_chat.make_parser().parse_args_into_dataclasses(
        ["--model_name_or_path", "m", "--persona", "a", "b"]
    )
    assert parsed[0].persona == ["a", "b"] and parsed[1].max_new_tokens == 20


def test_sampling_is_seeded(model, tokenizer):
    first = generate_replies(model, tokenizer, CONTEXTS, seed=3, min_length=5)
    again = generate_replies(model, tokenizer, CONTEXTS, seed=3, min_length=5)
    assert first == again and all(first)


def test_persona_bot_keeps_history_and_resets(model, tokenizer):
    bot = PersonaBot(model, tokenizer, PERSONA, no_sample=True, max_history=1, min_length=2)
    first = bot.reply("hi , how are you ?")
    assert first and bot.history == ["hi , how are you ?", first]
    # Same reply as the batch API on the same context.
    assert (
        first
        == generate_replies(model, tokenizer, [(PERSONA, ["hi , how are you ?"])], no_sample=True, min_length=2)[0]
    )
    bot.reply("what do you do ?")
    bot.reply("nice .")
    assert len(bot.history) == 3  # 2*max_history+1
    bot.reset()
    assert bot.history == [] and bot.persona == PERSONA
    bot.reply("hello")
    bot.persona = ["i am a pilot.", "  "]
    assert bot.persona == ["i am a pilot."] and bot.history == []


def test_load_for_chat_bf16(tiny_checkpoint, tokenizer):
    model, tok = persona_chat.load_for_chat(tiny_checkpoint, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert len(generate_reply_ids(model, tok, CONTEXTS[:2], no_sample=True, min_length=3)[0]) >= 3


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, tiny_model_and_tokenizer):
    """A checkpoint as persona-train writes it: persona special tokens already in the tokenizer."""
    out = tmp_path_factory.mktemp("chat-ckpt")
    model, tokenizer = tiny_model_and_tokenizer
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.slow
def test_stdin_mode_end_to_end(saved_checkpoint, model, tokenizer, tmp_path):
    persona_file = tmp_path / "persona.txt"
    persona_file.write_text("i am a nurse.\n\nmy favorite color is purple.\n")
    args = ["--model_name_or_path", saved_checkpoint, "--persona", "i love cats.", "--persona_file", str(persona_file)]
    long_turn = "hello " * 300  # far over the model's window: the context is cut, never the reply budget
    result = run_cli(
        "persona_chat.py",
        [*args, "--stdin", "--no_sample", "--min_length", "3", "--device", "cpu", "--max_new_tokens=20"],
        f"hi !\n\nwhat do you do ?\n{long_turn}\nok .\n",
    )
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split("\n")[:-1]
    # Independent expectation: the in-process bot with the same persona and options; one line out per line in.
    bot = PersonaBot(model, tokenizer, PERSONA, no_sample=True, min_length=3)
    expected = [
        " ".join(bot.reply(t).split()) if t else "" for t in ("hi !", "", "what do you do ?", long_turn, "ok .")
    ]
    assert replies == expected and len(replies) == 5
    assert "i love cats." in result.stderr and "my favorite color is purple." in result.stderr


@pytest.mark.slow
def test_interactive_mode_commands_and_clean_eof(saved_checkpoint, personachat_json, synthetic_data):
    args = ["--model_name_or_path", saved_checkpoint, "--dataset_path", personachat_json, "--seed", "0"]
    result = run_cli(
        "persona_chat.py", args, "hello\n\n/persona\n/reset\n/persona i am a pilot. | i fly planes.\n/bogus x\nhi\n"
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    personas = [" ".join(d["personality"]) for d in synthetic_data["valid"]]
    shown = result.stdout.split("Persona:")[1].split("Talk to the bot")[0]
    assert " ".join(line.strip(" -") for line in shown.split("\n") if line.strip()) in personas
    assert "(history cleared)" in result.stdout and "  - i fly planes." in result.stdout
    assert "(unknown command /bogus: /reset clears the history" in result.stdout
    assert result.stdout.count(">>> ") == 8  # one prompt per line, plus the one EOF answers


@pytest.mark.slow
def test_persona_typed_at_start_up(saved_checkpoint):
    result = run_cli(
        "persona_chat.py",
        ["--model_name_or_path", saved_checkpoint, "--no_sample"],
        "i like tea.\ni am tall.\n\nhello\n",
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "persona> " in result.stdout and "  - i like tea.\n  - i am tall.\n" in result.stdout


def test_long_context_is_cut_to_fit_the_model(tokenizer, ids):
    history = [f"turn {i} is a rather long sentence about many different things ." for i in range(5)]
    full = build_context(tokenizer, PERSONA, history, max_history=2)["input_ids"]
    # One position short of the whole context plus a 20-token reply (its stop token among the 20).
    cut = build_context(tokenizer, PERSONA, history, max_history=2, max_length=full.size(1) + 19, reply_budget=20)
    assert cut["input_ids"].size(1) + 20 <= full.size(1) + 19
    kept = tokenizer.decode(cut["input_ids"][0], skip_special_tokens=True)
    assert "turn 0" not in kept and "turn 4" in kept and "i love cats." in kept  # oldest turn dropped first


def test_generation_fits_the_window_whatever_the_turn(model, tokenizer):
    window = model.config.n_positions
    long_turn = "hello " * 300
    for options in ({"max_new_tokens": 20}, {"max_new_tokens": window - 3}):
        ids = generate_reply_ids(model, tokenizer, [(PERSONA, [long_turn]), ([], ["hi"])], no_sample=True, **options)
        assert len(ids) == 2
        context = build_context(
            tokenizer, PERSONA, [long_turn], max_length=window, reply_budget=options["max_new_tokens"]
        )
        assert context["input_ids"].size(1) + options["max_new_tokens"] <= window
    # The turn keeps its end (next to the reply); the persona stays when the turn alone overflows.
    marked = "start " + "hello " * 300 + "the end ."
    kept = tokenizer.decode(
        build_context(tokenizer, PERSONA, [marked], max_length=window, reply_budget=20)["input_ids"][0]
    )
    assert "the end ." in kept and "start" not in kept and "i love cats." in kept
    with pytest.raises(ValueError, match="lower --max_new_tokens"):
        generate_reply_ids(model, tokenizer, [(PERSONA, ["hi"])], no_sample=True, max_new_tokens=window)


@pytest.mark.slow
def test_stdin_without_a_persona_is_said_once(saved_checkpoint):
    args = ["--model_name_or_path", saved_checkpoint, "--stdin", "--max_new_tokens", "2", "--device", "cpu"]
    result = run_cli("persona_chat.py", args, "hi\nhow are you ?\n")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "no persona" in warnings[0] and "--persona" in warnings[0], result.stderr
    assert len(result.stdout.splitlines()) == 2  # the replies still come, one per line
