"""Test-only helpers over the training building blocks."""

from __future__ import annotations

from sft_dagster.formatting import EncodedExample
from sft_dagster.torchkit import collate, mean_loss_over, summed_response_loss


def validation_loss(model, examples: list[EncodedExample], batch_size: int, pad_id: int, device: str,
                    precision: str) -> float:
    """SFT's validation loss over padded rows (what `SFTMethod.validate` computes as `val_loss`)."""
    return mean_loss_over(model, examples, batch_size, lambda e: len(e.input_ids),
                          lambda rows: collate(rows, pad_id, device), summed_response_loss, device, precision)
