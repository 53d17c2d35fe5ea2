"""`PersonaCollator`: pads persona candidates to the longest sequence of the batch; `ArrowBatches` hands it a batch
of dataset rows as one Arrow table."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch

from persona_errors import UsageError

# The columns padded to [B, C, T]; the others pass through as they are, but a given attention mask: it is built here.
PADDED = ("input_ids", "token_type_ids", "labels")
BUILT = (*PADDED, "attention_mask")


@dataclass
class PersonaCollator:
    """Pad rows of `build_features` into `[B, C, T]` tensors (right padding, longest in batch).

    `input_ids` and `token_type_ids` are padded with `pad_token_id`, `labels` with `label_pad_token_id`; the
    `attention_mask` is built here (1 on tokens, 0 on padding). Columns it does not know pass through unchanged
    in `torch.tensor` form. The input features are never modified. The rows come as a list of dicts, or as one
    `pyarrow.Table` (`ArrowBatches`): the same batch either way.

    >>> collator = PersonaCollator(pad_token_id=0)
    >>> rows = [
    ...     {"input_ids": [[5, 6], [5, 6, 7]], "token_type_ids": [[1, 1], [1, 1, 2]],
    ...      "labels": [[-100, -100], [-100, 6, 7]], "mc_token_ids": [1, 2], "mc_labels": 1},
    ...     {"input_ids": [[8], [9]], "token_type_ids": [[1], [2]], "labels": [[-100], [9]],
    ...      "mc_token_ids": [0, 0], "mc_labels": 1},
    ... ]
    >>> batch = collator(rows)
    >>> batch["input_ids"].tolist()
    [[[5, 6, 0], [5, 6, 7]], [[8, 0, 0], [9, 0, 0]]]
    >>> batch["labels"].tolist()
    [[[-100, -100, -100], [-100, 6, 7]], [[-100, -100, -100], [9, -100, -100]]]
    >>> batch["attention_mask"][1].tolist()
    [[1, 0, 0], [1, 0, 0]]
    >>> batch["mc_token_ids"].shape, batch["mc_labels"].tolist()
    (torch.Size([2, 2]), [1, 1])
    >>> arrow = collator(pa.Table.from_pylist(rows))
    >>> all(torch.equal(arrow[key], batch[key]) for key in batch)
    True
    """

    pad_token_id: int
    label_pad_token_id: int = -100
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict] | pa.Table) -> dict[str, torch.Tensor]:
        if isinstance(features, pa.Table):
            counts, lengths, values, rest = _arrow_columns(features)
        else:
            counts, lengths, values, rest = _python_columns(features)
        if not counts:
            raise ValueError("PersonaCollator got an empty batch.")
        if len(set(counts)) != 1:
            raise UsageError(
                f"Every row of a batch needs the same number of candidates, got {sorted(set(counts))}; "
                "pass num_candidates to build_features (or use per_device_eval_batch_size=1)."
            )
        seq_len = int(lengths.max()) if lengths.numel() else 0
        if self.pad_to_multiple_of:
            seq_len = -(-seq_len // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(counts), counts[0], seq_len)
        # One tensor per column, scattered under the token mask (row-major, so in sequence order): a conversion
        # per candidate costs a fifth of an eval step.
        tokens = torch.arange(seq_len) < lengths[:, None]  # [B*C, T]
        batch = {}
        for key, flat in values.items():
            pad = self.label_pad_token_id if key == "labels" else self.pad_token_id
            batch[key] = torch.full(shape, pad, dtype=torch.long)
            batch[key].view(-1, seq_len)[tokens] = flat
        batch["attention_mask"] = tokens.view(shape).long()
        batch.update(rest)
        return batch


def _python_columns(features: list[dict]) -> tuple[list[int], torch.Tensor, dict, dict]:
    """(candidates per row, [B*C] sequence lengths, flat tokens of each padded column, the other columns)."""
    if not features:
        return [], torch.zeros(0, dtype=torch.long), {}, {}
    counts = [len(f["input_ids"]) for f in features]
    lengths = torch.tensor([len(ids) for f in features for ids in f["input_ids"]], dtype=torch.long)
    values = {
        key: torch.tensor([t for f in features for seq in f[key] for t in seq], dtype=torch.long)
        for key in PADDED
        if key in features[0]
    }
    rest = {key: _tensor([f[key] for f in features]) for key in features[0] if key not in BUILT}
    return counts, lengths, values, rest


def _arrow_columns(table: pa.Table) -> tuple[list[int], torch.Tensor, dict, dict]:
    """`_python_columns` of an Arrow table: the padded columns straight from their value buffers, no Python ints.

    Why not the list-of-dicts form `datasets` gives by default: converting every token to a Python int and back
    costs more than the whole packed model forward of a 20-candidate evaluation batch (tiny GPT-2, 2-core CPU).
    """
    if table.num_rows == 0:
        return [], torch.zeros(0, dtype=torch.long), {}, {}
    sequences = table.column("input_ids").combine_chunks()
    counts = pc.list_value_length(sequences).to_pylist()
    lengths = torch.from_numpy(pc.list_value_length(sequences.flatten()).to_numpy().astype("int64"))
    values = {}
    for key in PADDED:
        if key in table.column_names:
            flat = table.column(key).combine_chunks().flatten().flatten()
            values[key] = torch.from_numpy(flat.to_numpy(zero_copy_only=False).astype("int64"))
    rest = {key: _tensor(table.column(key).to_pylist()) for key in table.column_names if key not in BUILT}
    return counts, lengths, values, rest


def candidate_counts(features: list[dict] | pa.Table) -> list[int]:
    """The number of candidates of each row of a batch (a list of rows or an Arrow table)."""
    if isinstance(features, pa.Table):
        return pc.list_value_length(features.column("input_ids")).to_pylist()
    return [len(feature["input_ids"]) for feature in features]


def _tensor(values: list) -> torch.Tensor:
    """A column that is not padded: integers as int64, floats (e.g. precomputed reference log-probabilities,
    `persona_dpo`) as float32."""
    tensor = torch.tensor(values)
    return tensor.float() if tensor.is_floating_point() else tensor.long()


class ArrowBatches(torch.utils.data.Dataset):
    """A `datasets.Dataset` seen by a `DataLoader`: one row is a dict, a batch of rows one `pyarrow.Table`.

    The DataLoader fetches a batch with `__getitems__`; `datasets` would turn it into a list of dicts of Python
    lists, `PersonaCollator` takes the Arrow table as it is (`_arrow_columns`). Samplers that read single rows
    (`group_by_length`) still get dicts.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self._arrow = dataset.with_format("arrow")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> pa.Table:
        return self._arrow[list(indices)]
