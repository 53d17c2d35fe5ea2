"""What several test modules share (plain functions and constants; the fixtures built from them are in conftest.py):
tiny model configs, the synthetic tensors of the encoding tests, the chat-template families, the command-line runners
and the multi-process launcher."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import PretrainedConfig

from persona_chat_options import DEFAULT_SYSTEM_PROMPT
from persona_collator import PersonaCollator
from persona_inputs import build_inputs
from persona_nli import NLIScorer
from persona_tokens import SpecialTokenIds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "run_persona_probe.py")

# Tiny configs: one builder for every family the tests use.

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256}
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0}

# Each chat-template family: the token that ends an assistant turn.
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}
# Instruct backbone family -> its tokenizer/template family.
INSTRUCT_FAMILIES = {"qwen2": "chatml", "llama": "llama3"}


def backbone_config(family: str, vocab_size: int, **overrides):
    """A tiny random config of one family: gpt2 and openai-gpt (4 heads, 256 positions), opt (with a projected
    embedding size, word_embed_proj_dim != hidden), llama (tied embeddings, like SmolLM2), qwen2 (untied)."""
    from transformers import GPT2Config, LlamaConfig, OpenAIGPTConfig, OPTConfig, Qwen2Config

    if family in ("gpt2", "openai-gpt"):
        kwargs = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}
        config_class = GPT2Config if family == "gpt2" else OpenAIGPTConfig
        return config_class(vocab_size=vocab_size, **{**kwargs, **overrides})
    if family == "opt":
        kwargs = {**SMALL, "ffn_dim": 64, "word_embed_proj_dim": 16, "dropout": 0.0}
        return OPTConfig(vocab_size=vocab_size, **{**kwargs, **overrides})
    kwargs = {**SMALL, "intermediate_size": 64, "num_key_value_heads": 2}
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=True, **{**kwargs, **overrides})
    if family == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=False, **{**kwargs, **overrides})
    raise ValueError(f"no tiny config for family {family!r}")


# Synthetic candidate batches and tiny models of the encoding tests (packed, shared prefix, plain).

SPEAKERS = SpecialTokenIds(bos=1, eos=2, speaker1=3, speaker2=4)
PAD = 0
VOCAB = 64
ENCODING_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mc_token_ids", "labels")


def tiny_gpt2(seed: int = 0, n_positions: int = 256, **overrides):
    """A tiny random `PersonaGPT2DoubleHeadsModel` without dropout (eval mode)."""
    from persona_backbone import PersonaGPT2DoubleHeadsModel

    torch.manual_seed(seed)
    config = backbone_config("gpt2", VOCAB, n_positions=n_positions, **{**NO_DROPOUT, **overrides})
    return PersonaGPT2DoubleHeadsModel(config).eval()


def tiny_openai_gpt():
    """A tiny random `PersonaOpenAIGPTDoubleHeadsModel` without dropout (eval mode): no cache, no custom 4D mask."""
    from persona_backbone import PersonaOpenAIGPTDoubleHeadsModel

    torch.manual_seed(0)
    return PersonaOpenAIGPTDoubleHeadsModel(backbone_config("openai-gpt", VOCAB, **NO_DROPOUT)).eval()


def tiny_double_heads(family: str, seed: int = 0, **overrides):
    """A tiny random `PersonaDoubleHeadsModel` on `family` (eval mode, no dropout in the multiple-choice head)."""
    from persona_backbone import PersonaDoubleHeadsConfig, PersonaDoubleHeadsModel

    config = backbone_config(family, VOCAB, **overrides)
    torch.manual_seed(seed)
    model = PersonaDoubleHeadsModel(PersonaDoubleHeadsConfig.from_backbone(config, summary_first_dropout=0.0))
    return model.eval()


def random_example(rng: random.Random, num_candidates: int, max_history: int, long: bool, shared_start: bool) -> dict:
    """One `build_features`-style row (built with the reference builder) with random lengths."""
    words = lambda n: [rng.randrange(5, VOCAB) for _ in range(n)]  # noqa: E731
    scale = 4 if long else 1
    persona = [words(rng.randint(1, 5 * scale)) for _ in range(rng.randint(0, 3))]
    history = [words(rng.randint(1, 6 * scale)) for _ in range(rng.choice([1, 3, 5, 7]))]
    history = history[-(2 * max_history + 1) :]
    start = words(2) if shared_start else []  # candidates sharing their first reply tokens
    replies = [start + words(rng.randint(1, 9)) for _ in range(num_candidates)]
    gold = num_candidates - 1
    rows = [build_inputs(persona, history, r, SPEAKERS, lm_labels=i == gold) for i, r in enumerate(replies)]
    row = {key: [r[key] for r in rows] for key in ("input_ids", "token_type_ids", "labels", "mc_token_ids")}
    row["mc_labels"] = num_candidates - 1
    return row


def random_batch(seed: int, batch_size: int, num_candidates: int, max_history: int = 2, mixed: bool = True) -> dict:
    rng = random.Random(seed)
    rows = [
        random_example(rng, num_candidates, max_history, long=mixed and b % 2 == 0, shared_start=b % 3 == 1)
        for b in range(batch_size)
    ]
    return PersonaCollator(pad_token_id=PAD)(rows)


def count_backbone_calls(backbone) -> list:
    """Shapes [N, L] of the backbone's outputs, one per call (a forward hook)."""
    shapes = []
    backbone.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.last_hidden_state.shape[:2])))
    return shapes


@contextlib.contextmanager
def encodings_run():
    """The candidate encodings that ran inside the block, in order: "packed-tree" or "packed-dense" (the packed
    encoding and its attention), "shared_prefix" or "plain" (spies on the three encoders that
    `persona_encoding.encode_candidates` dispatches to), so that an equivalence test knows what it compared."""
    import persona_encoding

    ran = []

    def spy(encode, label):
        def spied(*args, **kwargs):
            ran.append(f"{label}-{kwargs['attention']}" if label == "packed" else label)
            return encode(*args, **kwargs)

        return spied

    with pytest.MonkeyPatch.context() as patch:
        for name, label in (("encode_packed", "packed"), ("encode_shared_prefix", "shared_prefix")):
            patch.setattr(persona_encoding, name, spy(getattr(persona_encoding, name), label))
        patch.setattr(persona_encoding, "encode_in_full", spy(persona_encoding.encode_in_full, "plain"))
        yield ran


# Chat-template families: tokenizers trained on rendered conversations (the `tokenizers` fixture in conftest.py).

# Qwen2.5-Instruct's template (ChatML with tools), as published with the model.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501

# Meta-Llama-3-Instruct's template (bos, headers, trimmed content, <|eot_id|>).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma's template: no system role (raises), strict user-first alternation.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# ChatML that silently skips system messages.
DROPS_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
    "'<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A thinking-style template: the generation prompt opens an empty think block that a rendered reply does not have.
NON_PREFIX_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{% endif %}"
)

# The pre-tokenizer patterns of Qwen2 and Llama 3 (GPT-2's, with newline runs kept whole).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = QWEN2_PATTERN.replace(r"\p{N}|", r"\p{N}{1,3}|")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

CHAT_FAMILIES = {  # special tokens, the tokenizer attributes, the template, the pre-tokenizer pattern
    "chatml": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        QWEN25_TEMPLATE,
        QWEN2_PATTERN,
    ),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        LLAMA3_TEMPLATE,
        LLAMA3_PATTERN,
    ),
    "gemma": (
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        {"bos_token": "<bos>", "eos_token": "<eos>"},
        GEMMA_TEMPLATE,
        LLAMA3_PATTERN,
    ),
    # Llama 3's template on a GPT-2 pre-tokenizer, which splits "\n\n" before a word but not at the end of a text.
    "llama3-gpt2-pretokenizer": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        LLAMA3_TEMPLATE,
        GPT2_PATTERN,
    ),
}


def reference_messages(persona, history, reply=None, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """The conversation written out independently: system, alternating turns ending with the user, the reply."""
    roles = ["user", "assistant"] if len(history) % 2 else ["assistant", "user"]
    messages = [{"role": "system", "content": system_prompt.replace("{persona}", "\n".join(persona))}]
    messages += [{"role": roles[j % 2], "content": turn} for j, turn in enumerate(history)]
    return messages + ([{"role": "assistant", "content": reply}] if reply is not None else [])


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, return_dict=False, **kwargs)


def train_chat_tokenizers(dialogs: list[dict], root) -> dict[str, str]:
    """Tiny byte-level BPE tokenizers with each family's pre-tokenizer, special tokens and template, saved under
    `root` as a Hub checkpoint would be (their folders, by family). They are trained on rendered conversations, so
    they learn merges such as "\\n\\n" and "assistant" that make token boundaries matter."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from persona_synthetic import corpus_texts

    data = {"train": dialogs}
    out = {}
    for family, (specials, attrs, template, pattern) in CHAT_FAMILIES.items():
        renderer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), **attrs)
        conversations = [
            renderer.apply_chat_template(
                reference_messages(d["personality"], u["history"], reply)[family == "gemma" :],
                chat_template=template,
                tokenize=False,
                add_generation_prompt=reply is None,
            )
            for d in dialogs
            for u in d["utterances"]
            for reply in (u["candidates"][-1], None)
            if family != "gemma" or len(u["history"]) % 2
        ]
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        bpe.train_from_iterator([*corpus_texts(data), *conversations], trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, additional_special_tokens=specials, **attrs)
        tokenizer.chat_template = template
        path = os.path.join(str(root), f"tok-{family}")
        tokenizer.save_pretrained(path)
        out[family] = path
    return out


# Command lines: in-process error lines, subprocesses where the process boundary is what a test is about.


def error_line(cli, argv, capsys) -> str:
    """Run a console script's `cli(argv)` in-process; assert status 2 and exactly one `prog: error:` line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def no_loading(monkeypatch):
    """Fail the test if a model gets loaded: flag checks come first. The console scripts import the loaders inside
    main, from their homes (`persona_model.load_model_and_tokenizer`, `persona_generation.load_for_chat`): patched
    there, every script sees the refusal."""
    import persona_generation
    import persona_model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(persona_generation, "load_for_chat", refuse)
    monkeypatch.setattr(persona_model, "load_model_and_tokenizer", refuse)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(
    script: str,
    args,
    stdin: str | None = None,
    *,
    nproc: int = 1,
    env: dict | None = None,
    check: bool = True,
    cwd=ROOT,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS` (SCRIPT relative to the repository root), under torchrun with `nproc` > 1, offline and
    on one thread; with `check`, a non-zero exit fails the test with the command and the ends of its output."""
    script = os.path.join(ROOT, script)
    if nproc == 1:
        cmd = [sys.executable, script, *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
        cmd += list(map(str, args))
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    full_env = {**os.environ, **offline, "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
    proc = subprocess.run(cmd, input=stdin, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


# Multi-process training runs (tests/test_distributed.py, test_dpo.py, test_instruct.py).

LR = 0.1
# One optimizer step over a fixed global batch of 8 rows (the whole training set): 2 per device x accumulation x
# processes. SGD without clipping makes the update proportional to the gradient, so any loss-normalisation error
# across accumulation or processes shows (Adam's first step is ~lr·sign(g) and would hide it).
STEP_ARGS = ["--max_train_samples", "8", "--max_steps", "1", "--optim", "sgd", "--learning_rate", str(LR),
             "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--weight_decay", "0", "--lm_coef", "2.0",
             "--per_device_train_batch_size", "2", "--save_strategy", "no"]  # fmt: skip


def run_args(assets, output_dir, *extra) -> list[str]:
    return [
        "--model_name_or_path", assets["model"],
        "--dataset_path", assets["data"],
        "--dataset_cache", assets["cache"],
        "--output_dir", str(output_dir),
        "--num_candidates", "2",
        "--use_cpu",
        "--report_to", "none",
        "--seed", "0",
        "--eval_strategy", "no",
        "--do_eval", "false",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def launch(args: list[str], nproc: int = 1, env: dict | None = None, check: bool = True):
    """Run the probed run_persona.py (tests/run_persona_probe.py) in `nproc` processes (torchrun, gloo)."""
    return run_cli(PROBE, args, nproc=nproc, env=env, check=check)


def load_weights(output_dir) -> dict[str, torch.Tensor]:
    from persona_backbone import PersonaGPT2DoubleHeadsModel

    return PersonaGPT2DoubleHeadsModel.from_pretrained(str(output_dir)).state_dict()


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6):
    """Two state dicts: the same names, each tensor equal to `atol`."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


class RuleNLI(torch.nn.Module):
    """A stub NLI checkpoint whose label for a (reply, persona sentence) pair comes from `judge`; its tokenizer hands
    the pair's index to the model, so no text is really encoded."""

    def __init__(self, judge, id2label=("contradiction", "entailment", "neutral")):
        super().__init__()
        self.config = PretrainedConfig(id2label=dict(enumerate(id2label)))
        self.judge, self.id2label, self.pairs = judge, id2label, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, so the scorer finds a device

    def tokenizer(self, first, second, **kwargs):
        start = len(self.pairs)
        self.pairs.extend(zip(first, second))
        return {"input_ids": torch.arange(start, len(self.pairs))[:, None]}

    def forward(self, input_ids):
        logits = torch.zeros(len(input_ids), 3)
        for row, index in enumerate(input_ids[:, 0].tolist()):
            logits[row, self.id2label.index(self.judge(*self.pairs[index]))] = 5.0
        return SimpleNamespace(logits=logits)


def stub_scorer(judge) -> NLIScorer:
    model = RuleNLI(judge)
    return NLIScorer(model, model.tokenizer, name="rule-nli", batch_size=4)
