"""Any causal LM as the persona backbone: tiny random OPT, Llama and Qwen2 models through the whole pipeline."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import backbone_config
from transformers import AutoConfig, AutoModelForCausalLM, ViTConfig

from persona_backbone import DOUBLE_HEADS_CLASSES, PersonaDoubleHeadsConfig, PersonaDoubleHeadsModel
from persona_collator import PersonaCollator
from persona_data import build_features, load_dialogs
from persona_heads import DoubleHeadsOutput
from persona_inputs import build_inputs
from persona_lora import apply_lora, lora_settings
from persona_model import SPECIAL_TOKENS, load_model_and_tokenizer, multiple_choice_head_loaded
from persona_synthetic import corpus_texts, make_synthetic_personachat, train_tiny_tokenizer
from persona_tokens import SpecialTokenIds

FAMILIES = ["opt", "llama", "qwen2"]


@pytest.fixture(scope="module")
def backbone_data(tmp_path_factory) -> dict:
    # Enough validation dialogs for 19 distractors per turn.
    data = make_synthetic_personachat(num_train=40, num_valid=12, seed=0)
    path = tmp_path_factory.mktemp("bb-data") / "personachat.json"
    path.write_text(json.dumps(data))
    return {"data": data, "path": str(path)}


@pytest.fixture(scope="module")
def backbone_checkpoints(tmp_path_factory, backbone_data) -> dict[str, str]:
    """Plain causal-LM checkpoints (as downloaded from the Hub): random weights + a tokenizer without persona tokens."""
    root = tmp_path_factory.mktemp("backbones")
    tokenizer = train_tiny_tokenizer(corpus_texts(backbone_data["data"]), str(root / "tokenizer"))
    assert tokenizer.pad_token is None  # the case the loader must handle
    paths = {}
    for seed, family in enumerate(FAMILIES):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(backbone_config(family, len(tokenizer)))
        paths[family] = str(root / family)
        model.save_pretrained(paths[family])
        tokenizer.save_pretrained(paths[family])
    return paths


def candidate_batch(tokenizer, dialogs_path: str, rows: int = 3, num_candidates: int = 3) -> dict[str, torch.Tensor]:
    dialogs = load_dialogs(dialogs_path)["valid"].select(range(1))
    features = build_features(dialogs, tokenizer, num_candidates=num_candidates, max_history=1)
    return PersonaCollator(tokenizer.pad_token_id)([features[i] for i in range(rows)])


def reference_losses(model: PersonaDoubleHeadsModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """LM and MC losses computed by the plain causal LM (full [N, T, V] logits) and a hand-written head."""
    text_config = model.config.text_config
    plain = AutoModelForCausalLM.from_config(text_config).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and set(unexpected) == {
        "multiple_choice_head.summary.weight",
        "multiple_choice_head.summary.bias",
    }
    batch_size, num_candidates, seq_len = batch["input_ids"].shape
    ids = batch["input_ids"].view(-1, seq_len)
    types = batch["token_type_ids"].view(-1, seq_len)
    mask = batch["attention_mask"].view(-1, seq_len)
    embeds = plain.get_input_embeddings()(ids) + plain.get_input_embeddings()(types)
    logits = plain(inputs_embeds=embeds, attention_mask=mask).logits  # [N, T, V]
    labels = batch["labels"].view(-1, seq_len)
    lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
    hidden = plain.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    summary = model.multiple_choice_head.summary
    mc_token_ids = batch["mc_token_ids"].view(-1)
    scores = [hidden[n, mc_token_ids[n]] @ summary.weight[0] + summary.bias[0] for n in range(ids.size(0))]
    mc_loss = F.cross_entropy(torch.stack(scores).view(batch_size, num_candidates), batch["mc_labels"])
    return lm_loss, mc_loss


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_checkpoint_loads_as_double_heads_with_persona_tokens(backbone_checkpoints, family):
    model, tokenizer = load_model_and_tokenizer(backbone_checkpoints[family])
    assert type(model) is PersonaDoubleHeadsModel and model.config.text_config.model_type == family
    assert family not in DOUBLE_HEADS_CLASSES
    # The tokenizer had no pad token: add_special_tokens gives it <pad>, and the model config follows.
    assert tokenizer.pad_token == "<pad>" and model.config.pad_token_id == tokenizer.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == model.config.vocab_size
    # The LM part is the backbone: the original rows of the vocabulary give the original logits.
    plain = AutoModelForCausalLM.from_pretrained(backbone_checkpoints[family]).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        got = model.eval()(input_ids=ids).logits[..., : expected.size(-1)]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_double_heads_loss_equals_full_logits_reference(backbone_checkpoints, backbone_data, family):
    model, tokenizer = load_model_and_tokenizer(backbone_checkpoints[family])
    model.eval()
    batch = candidate_batch(tokenizer, backbone_data["path"])
    with torch.no_grad():
        out = model(**batch)
        lm_ref, mc_ref = reference_losses(model, batch)
        # Without labels: the candidate forward gives the same scores (what a ranking evaluation reads).
        scores = model(**{k: v for k, v in batch.items() if k not in ("labels", "mc_labels")}).mc_logits
    assert isinstance(out, DoubleHeadsOutput) and out.mc_logits.shape == (3, 3)
    torch.testing.assert_close(out.lm_loss, lm_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mc_loss, mc_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, out.mc_logits)
    assert out.loss is out.lm_loss
    assert out.lm_tokens.tolist() == batch["labels"][..., 1:].ne(-100).sum((1, 2)).tolist()
    torch.testing.assert_close(out.lm_nll.sum() / out.lm_tokens.sum(), lm_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cached_greedy_equals_full_reencode(backbone_checkpoints, family):
    model, tokenizer = load_model_and_tokenizer(backbone_checkpoints[family])
    model.eval()
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    speakers = special
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    inputs = build_inputs(
        [encode("i have cats at home."), encode("i live in paris.")],
        [encode("hello there!"), encode("hi , nice to meet you too ."), encode("where do you live?")],
        [],
        speakers,
        with_eos=False,
    )
    input_ids = torch.tensor([inputs["input_ids"]])
    token_type_ids = torch.tensor([inputs["token_type_ids"]])
    assert token_type_ids[0, -1] == special.speaker1  # the reply segment: generated tokens repeat it
    lengths = []
    handle = model.register_forward_pre_hook(
        lambda m, a, kw: lengths.append(kw["input_ids"].shape[-1]), with_kwargs=True
    )
    generated = model.generate(
        input_ids=input_ids,
        token_type_ids=token_type_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
    )
    handle.remove()
    assert lengths == [input_ids.size(1)] + [1] * 7  # the KV cache is used: one new token per step
    ids, types = input_ids, token_type_ids
    with torch.no_grad():
        for _ in range(8):  # the reference's loop: re-encode everything for every token
            next_id = model(input_ids=ids, token_type_ids=types).logits[:, -1].argmax(-1, keepdim=True)
            ids, types = torch.cat([ids, next_id], 1), torch.cat([types, types[:, -1:]], 1)
    assert generated.tolist() == ids.tolist()


def test_left_padded_batch_generates_as_one_by_one(backbone_checkpoints):
    model, tokenizer = load_model_and_tokenizer(backbone_checkpoints["llama"])
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    s1, s2 = special.speaker1, special.speaker2
    long_ids, long_types = [special.bos, 10, 11, 12, s2, 20, 21, s1], [s1] * 4 + [s2] * 3 + [s1]
    short_ids, short_types = [special.bos, 13, s2, 22, s1], [s1] * 2 + [s2] * 2 + [s1]
    options = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "pad_token_id": special.pad}

    def generate(ids, types, mask):
        out = model.eval().generate(input_ids=ids, token_type_ids=types, attention_mask=mask, **options)
        return out[:, ids.size(1) :].tolist()

    one_by_one = [
        generate(torch.tensor([ids]), torch.tensor([types]), torch.ones(1, len(ids), dtype=torch.long))[0]
        for ids, types in ((long_ids, long_types), (short_ids, short_types))
    ]
    pad = [special.pad] * (len(long_ids) - len(short_ids))
    batched = generate(
        torch.tensor([long_ids, pad + short_ids]),
        torch.tensor([long_types, pad + short_types]),
        torch.tensor([[1] * len(long_ids), [0] * len(pad) + [1] * len(short_ids)]),
    )
    assert batched == one_by_one


def test_speaker_embeddings_change_the_output(backbone_checkpoints):
    model, tokenizer = load_model_and_tokenizer(backbone_checkpoints["qwen2"])
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    ids = torch.tensor([[special.bos, 10, 11, 12]])
    with torch.no_grad():
        as_speaker1 = model.eval()(input_ids=ids, token_type_ids=torch.full_like(ids, special.speaker1)).logits
        as_speaker2 = model(input_ids=ids, token_type_ids=torch.full_like(ids, special.speaker2)).logits
        model.config.speaker_embeddings = False
        ignored = model(input_ids=ids, token_type_ids=torch.full_like(ids, special.speaker1)).logits
        plain = model(input_ids=ids).logits
    assert not torch.allclose(as_speaker1, as_speaker2)
    torch.testing.assert_close(ignored, plain, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(backbone_checkpoints, backbone_data):
    model, tokenizer = load_model_and_tokenizer(backbone_checkpoints["llama"])
    model.config.summary_first_dropout = 0.0
    model.multiple_choice_head.first_dropout.p = 0.0  # train mode, yet deterministic
    batch = candidate_batch(tokenizer, backbone_data["path"], rows=2, num_candidates=2)

    def grads():
        model.zero_grad()
        out = model.train()(**batch)
        (out.lm_loss + out.mc_loss).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()  # v5 name of gradient_checkpointing_enable
    assert model.model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and "multiple_choice_head.summary.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bfloat16_load_and_loss(backbone_checkpoints, backbone_data, tmp_path):
    model, tokenizer = load_model_and_tokenizer(backbone_checkpoints["qwen2"], dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = model(**candidate_batch(tokenizer, backbone_data["path"]))
    assert torch.isfinite(out.lm_loss) and torch.isfinite(out.mc_loss) and out.lm_nll.dtype == torch.float32
    (out.lm_loss + out.mc_loss).backward()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_config_round_trip(backbone_checkpoints, tmp_path):
    config = PersonaDoubleHeadsConfig.from_backbone(
        AutoModelForCausalLM.from_pretrained(backbone_checkpoints["opt"]).config, summary_first_dropout=0.3
    )
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "opt" and on_disk["architectures"] == ["OPTForCausalLM"]
    assert on_disk["persona_double_heads"] == {"summary_first_dropout": 0.3, "speaker_embeddings": True}
    again = PersonaDoubleHeadsConfig.from_pretrained(tmp_path)
    assert again.summary_first_dropout == 0.3 and again.text_config.word_embed_proj_dim == 16
    assert not hasattr(again.text_config, "persona_double_heads")
    assert again.max_position_embeddings == 256  # backbone attributes read through
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        PersonaDoubleHeadsConfig.from_backbone(ViTConfig())  # an encoder-only vision model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_saved_folder_is_exactly_a_causal_lm_checkpoint_with_the_head_beside_it(backbone_checkpoints, family, tmp_path):
    from safetensors.torch import load_file, save_file

    from persona_backbone import MC_HEAD_FILE

    model, tokenizer = load_model_and_tokenizer(backbone_checkpoints[family])
    assert not multiple_choice_head_loaded(model)  # a plain causal LM: the head is new
    with torch.no_grad():  # a head unlike any fresh initialisation
        model.multiple_choice_head.summary.weight.uniform_(-1, 1)
        model.multiple_choice_head.summary.bias.fill_(0.5)
    model.save_pretrained(tmp_path / "run")
    tokenizer.save_pretrained(tmp_path / "run")

    saved = load_file(tmp_path / "run" / "model.safetensors")
    causal_lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path / "run"))
    expected = set(causal_lm.state_dict())
    if causal_lm.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    assert set(saved) == expected
    assert set(load_file(tmp_path / "run" / MC_HEAD_FILE)) == {"summary.weight", "summary.bias"}
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "run", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    reloaded, _ = load_model_and_tokenizer(str(tmp_path / "run"))
    assert multiple_choice_head_loaded(reloaded)
    torch.testing.assert_close(
        reloaded.multiple_choice_head.state_dict(), model.multiple_choice_head.state_dict(), rtol=0, atol=0
    )
    direct, info = PersonaDoubleHeadsModel.from_pretrained(tmp_path / "run", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and multiple_choice_head_loaded(direct)

    # A folder saved with the head inside model.safetensors (the earlier layout) still loads its head.
    old = tmp_path / "old"
    old.mkdir()
    for name in os.listdir(tmp_path / "run"):
        if name not in ("model.safetensors", MC_HEAD_FILE):
            (old / name).write_bytes((tmp_path / "run" / name).read_bytes())
    inside = {
        **saved,
        **{f"multiple_choice_head.{k}": v for k, v in load_file(tmp_path / "run" / MC_HEAD_FILE).items()},
    }
    save_file(inside, old / "model.safetensors", metadata={"format": "pt"})
    from_old, _ = load_model_and_tokenizer(str(old))
    assert multiple_choice_head_loaded(from_old)
    torch.testing.assert_close(from_old.state_dict(), reloaded.state_dict(), rtol=0, atol=0)


def test_lora_settings_with_peft(backbone_checkpoints, backbone_data):
    peft = pytest.importorskip("peft")
    model, tokenizer = load_model_and_tokenizer(backbone_checkpoints["llama"])  # tied embeddings
    settings = lora_settings(model, tokenizer)
    assert settings["trainable_token_indices"] == {"embed_tokens": tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_dropout=0.0, **settings))
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert any("q_proj.lora_A" in name for name in trainable) and any("multiple_choice_head" in n for n in trainable)
    assert not any(name.endswith("embed_tokens.weight") for name in trainable)
    out = lora(**candidate_batch(tokenizer, backbone_data["path"]))
    assert isinstance(out, DoubleHeadsOutput)
    (out.lm_loss + out.mc_loss).backward()
    torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=1.0).step()
    merged = lora.merge_and_unload()
    assert type(merged) is PersonaDoubleHeadsModel
    after = dict(merged.named_parameters())
    embeddings_changed = (
        (after["model.embed_tokens.weight"] - before["model.embed_tokens.weight"]).abs().sum(1).nonzero()
    )
    assert set(embeddings_changed.view(-1).tolist()) <= set(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS))


@pytest.mark.parametrize("model_type", sorted(DOUBLE_HEADS_CLASSES))
def test_apply_lora_on_library_double_heads_classes(tokenizer, model_type):
    """Without named targets (PEFT's default, "all-linear" where it has none) only adapters, the MC head and the persona
    token rows train, and the loss path runs through the adapters."""
    pytest.importorskip("peft")
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2)
    model = apply_lora(DOUBLE_HEADS_CLASSES[model_type](config), tokenizer, r=2)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable) and any("token_adapter" in name for name in trainable)
    assert all(any(key in name for key in ("lora_", "multiple_choice_head", "token_adapter")) for name in trainable)
    ids = torch.randint(0, 40, (2, 2, 6))
    out = model(input_ids=ids, mc_token_ids=torch.full((2, 2), 5), labels=ids, mc_labels=torch.tensor([1, 1]))
    (out.lm_loss + out.mc_loss).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_train_save_load_generate_eval_round_trip(backbone_checkpoints, backbone_data, family, tmp_path):
    from persona_trainer import PersonaTrainer, PersonaTrainingArguments
    from run_persona import DataArguments, ModelArguments, main

    output_dir = str(tmp_path / "run")
    training_args = PersonaTrainingArguments(
        output_dir=output_dir,
        max_steps=12,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    data_args = DataArguments(
        dataset_path=backbone_data["path"],
        dataset_cache=str(tmp_path / "cache"),
        num_candidates=2,
        max_history=1,
        max_eval_samples=4,
    )
    metrics = main(ModelArguments(model_name_or_path=backbone_checkpoints[family]), data_args, training_args)
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as f:
        losses = [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses

    # Reload: the double-heads class from the saved backbone-format folder, nothing added to the tokenizer.
    model, tokenizer = load_model_and_tokenizer(output_dir)
    assert type(model) is PersonaDoubleHeadsModel and model.config.text_config.model_type == family
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    assert model.config.pad_token_id == special.pad == tokenizer.pad_token_id
    direct = PersonaDoubleHeadsModel.from_pretrained(output_dir)  # without the project's loader
    torch.testing.assert_close(direct.state_dict(), model.state_dict(), rtol=0, atol=0)

    # Double-heads evaluation of the reloaded model gives the metrics of the model that was trained.
    eval_rows = build_features(
        load_dialogs(backbone_data["path"])["valid"], tokenizer, num_candidates=None, max_history=1
    ).select(range(4))
    eval_args = PersonaTrainingArguments(
        output_dir=str(tmp_path / "eval"), per_device_eval_batch_size=2, report_to="none", use_cpu=True, do_train=False
    )
    trainer = PersonaTrainer(
        model=model, args=eval_args, data_collator=PersonaCollator(tokenizer.pad_token_id), eval_dataset=eval_rows
    )
    reloaded = trainer.evaluate()
    for key in ("eval_hits@1", "eval_ppl", "eval_mc_loss"):
        assert reloaded[key] == pytest.approx(metrics[key], rel=1e-5), key

    # Generation (KV cache, speaker token types) works on the reloaded checkpoint and stops at <eos>.
    row = eval_rows[0]
    reply_start = next(i for i, label in enumerate(row["labels"][-1]) if label != -100)  # the gold is last
    context = row["input_ids"][-1][:reply_start]
    types = row["token_type_ids"][-1][: len(context)]
    generated = model.eval().generate(
        input_ids=torch.tensor([context]),
        token_type_ids=torch.tensor([types]),
        attention_mask=torch.ones(1, len(context), dtype=torch.long),
        max_new_tokens=12,
        do_sample=False,
    )
    assert generated.shape[1] > len(context) and generated[0, : len(context)].tolist() == context

    # The LM part loads as a plain causal LM from the same folder and gives the same logits.
    plain = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    assert type(plain).__name__ == type(AutoModelForCausalLM.from_pretrained(backbone_checkpoints[family])).__name__
    ids = torch.tensor([context])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
        with_speakers = plain(inputs_embeds=model.embed(ids, torch.tensor([types]))).logits
        torch.testing.assert_close(with_speakers, model(input_ids=ids, token_type_ids=torch.tensor([types])).logits)


def test_resume_restores_the_head_from_its_own_file(backbone_checkpoints, tmp_path):
    """The Trainer's resume loads model.safetensors only: the head must come back from its file too."""
    from persona_trainer import PersonaTrainer, PersonaTrainingArguments

    model, tokenizer = load_model_and_tokenizer(backbone_checkpoints["qwen2"])
    with torch.no_grad():
        model.multiple_choice_head.summary.weight.uniform_(-1, 1)
    model.save_pretrained(tmp_path / "checkpoint-1")
    fresh, _ = load_model_and_tokenizer(backbone_checkpoints["qwen2"])
    assert not torch.equal(fresh.multiple_choice_head.summary.weight, model.multiple_choice_head.summary.weight)
    args = PersonaTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    trainer = PersonaTrainer(model=fresh, args=args, data_collator=PersonaCollator(tokenizer.pad_token_id))
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)
