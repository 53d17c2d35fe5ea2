"""One plain SGD step through `PersonaTrainer` (lr 1, constant, no clipping), for tests that compare it with a step
computed by hand: gradient accumulation, packed rows, several processes."""

from __future__ import annotations

from persona_collator import PersonaCollator
from persona_trainer import PersonaTrainer, PersonaTrainingArguments


def one_sgd_step(
    model,
    rows,
    tmp_path,
    batch_size: int,
    accumulation: int,
    pad_token_id: int | None = None,
    trainer_class: type[PersonaTrainer] = PersonaTrainer,
    **extra,
) -> PersonaTrainer:
    """Train `model` in place for one optimizer step on `rows` (loss = 2 * lm_loss + mc_loss, plus the DPO loss with
    `objective="dpo"` and `trainer_class=PersonaDPOTrainer`); returns the trainer. Batches are padded with
    `pad_token_id` (default: the model config's)."""
    args = PersonaTrainingArguments(
        output_dir=str(tmp_path / f"b{batch_size}ga{accumulation}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        lm_coef=2.0,
        mc_coef=1.0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        **extra,
    )
    collator = PersonaCollator(model.config.pad_token_id if pad_token_id is None else pad_token_id)
    trainer = trainer_class(model=model, args=args, train_dataset=rows, data_collator=collator)
    trainer.train()
    return trainer


def assert_hand_step(loss, manual, *trained) -> None:
    """Take one SGD step (lr 1) on `manual` from `loss` by hand; every model of `trained` must hold its weights."""
    import torch

    loss.backward()
    with torch.no_grad():
        for p in manual.parameters():
            if p.grad is not None:
                p -= p.grad
    for name, expected in manual.state_dict().items():
        for model in trained:
            torch.testing.assert_close(model.state_dict()[name], expected, rtol=1e-5, atol=1e-6, msg=name)
