"""Joining masked sequences row by row (plain torch, no Lightning)."""

from __future__ import annotations

import torch


def concat_masked_sequences(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenates each row's real elements of every part, in order, then left-pads the rows.

    ``parts`` are ``(values [B, L_k, H], mask [B, L_k])`` pairs whose padding may sit anywhere
    (left-padded prompts, right-padded speech frames). Row ``b`` of the result holds
    ``part_0[b][mask] | part_1[b][mask] | ...`` with no padding in between, so the text model
    sees one contiguous sequence whatever the batch's other rows look like, and its last real
    element sits at the end of the row. Differentiable in the values.
    """
    batch_size, _, width = parts[0][0].shape
    device = parts[0][0].device
    masks = [mask.to(device=device, dtype=torch.bool) for _, mask in parts]
    totals = sum(mask.sum(dim=1) for mask in masks)
    length = int(totals.max())
    output = parts[0][0].new_zeros(batch_size, length, width)
    output_mask = torch.zeros(batch_size, length, dtype=torch.long, device=device)
    start = length - totals  # left padding of each row
    rows = torch.arange(batch_size, device=device)[:, None]
    for (values, _), mask in zip(parts, masks, strict=True):
        positions = start[:, None] + mask.long().cumsum(dim=1) - 1
        index = (rows.expand_as(mask)[mask], positions[mask])
        output = output.index_put(index, values[mask].to(output.dtype))
        output_mask[index] = 1
        start = start + mask.sum(dim=1)
    return output, output_mask


def speech_after_prompt(
    embed_tokens,
    speech: torch.Tensor,
    speech_mask: torch.Tensor,
    prompt: dict,
    opening_ids: torch.Tensor,
    closing_ids: torch.Tensor,
    prompt_cached: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``[opening tokens | prompt | speech tokens | closing tokens]`` as ``inputs_embeds``
    and mask, with no padding between the parts (``concat_masked_sequences``). ``prompt_cached``:
    the LLM's states of ``opening | prompt`` are cached, so the sequence starts at the speech."""
    rows = speech.shape[0]

    def same_in_every_row(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return embed_tokens(ids)[None].expand(rows, -1, -1), ids.new_ones(rows, len(ids))

    parts = []
    if not prompt_cached:
        parts = [
            same_in_every_row(opening_ids),
            (embed_tokens(prompt["input_ids"]), prompt["attention_mask"]),
        ]
    parts += [(speech, speech_mask), same_in_every_row(closing_ids)]
    return concat_masked_sequences(parts)
