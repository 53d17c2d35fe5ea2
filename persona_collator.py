"""`PersonaCollator`: pads persona candidates to the longest sequence of the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PersonaCollator:
    """Pad rows of `build_features` into `[B, C, T]` tensors (right padding, longest in batch).

    `input_ids` and `token_type_ids` are padded with `pad_token_id`, `labels` with `label_pad_token_id`; the
    `attention_mask` is built here (1 on tokens, 0 on padding). Columns it does not know pass through unchanged
    in `torch.tensor` form. The input features are never modified.

    >>> collator = PersonaCollator(pad_token_id=0)
    >>> batch = collator([
    ...     {"input_ids": [[5, 6], [5, 6, 7]], "token_type_ids": [[1, 1], [1, 1, 2]],
    ...      "labels": [[-100, -100], [-100, 6, 7]], "mc_token_ids": [1, 2], "mc_labels": 1},
    ...     {"input_ids": [[8], [9]], "token_type_ids": [[1], [2]], "labels": [[-100], [9]],
    ...      "mc_token_ids": [0, 0], "mc_labels": 1},
    ... ])
    >>> batch["input_ids"].tolist()
    [[[5, 6, 0], [5, 6, 7]], [[8, 0, 0], [9, 0, 0]]]
    >>> batch["labels"].tolist()
    [[[-100, -100, -100], [-100, 6, 7]], [[-100, -100, -100], [9, -100, -100]]]
    >>> batch["attention_mask"][1].tolist()
    [[1, 0, 0], [1, 0, 0]]
    >>> batch["mc_token_ids"].shape, batch["mc_labels"].tolist()
    (torch.Size([2, 2]), [1, 1])
    """

    pad_token_id: int
    label_pad_token_id: int = -100
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PersonaCollator got an empty batch.")
        num_candidates = {len(f["input_ids"]) for f in features}
        if len(num_candidates) != 1:
            raise ValueError(
                f"Every row of a batch needs the same number of candidates, got {sorted(num_candidates)}; "
                "pass num_candidates to build_features (or use per_device_eval_batch_size=1)."
            )
        (num_choices,) = num_candidates
        seq_len = max(len(seq) for f in features for seq in f["input_ids"])
        if self.pad_to_multiple_of:
            seq_len = -(-seq_len // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(features), num_choices, seq_len)
        pad_values = {"input_ids": self.pad_token_id, "token_type_ids": self.pad_token_id}
        pad_values["labels"] = self.label_pad_token_id
        batch = {
            key: torch.full(shape, value, dtype=torch.long) for key, value in pad_values.items() if key in features[0]
        }
        # One tensor per column from the concatenated sequences, scattered under the token mask (row-major, so in
        # sequence order): a per-candidate copy costs a tensor conversion per sequence, a fifth of an eval step.
        lengths = torch.tensor([len(ids) for f in features for ids in f["input_ids"]])  # [B*C]
        tokens = torch.arange(seq_len) < lengths[:, None]  # [B*C, T]
        batch["attention_mask"] = tokens.view(shape).long()
        for key in pad_values.keys() & batch.keys():
            values = torch.tensor([t for f in features for seq in f[key] for t in seq], dtype=torch.long)
            batch[key].view(-1, seq_len)[tokens] = values
        for key in features[0].keys() - batch.keys():
            batch[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return batch
