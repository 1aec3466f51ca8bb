"""What one model step's attention needs, built once per step from the batch's sequences.

The runner describes the batch as :class:`SeqSpec` s (context already in the cache, new
tokens this step, block ids) and calls :func:`build_attention_metadata` once. Everything
the layers need — the cache slot of every new token, the decode batch's padded block table
and key mask, per-chunk causal masks — is built here, on the CPU from Python ints, and moved
to the device in a few transfers. The layers use it through :mod:`pdserve.model.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SeqSpec:
    """One sequence's share of a batch, in batch order.

    Attributes:
        num_computed_tokens: tokens whose KV is already in the cache.
        num_new_tokens: tokens of this sequence in this step's input (≥ 1).
        block_ids: its KV blocks, covering at least
            ``num_computed_tokens + num_new_tokens`` tokens.
    """

    num_computed_tokens: int
    num_new_tokens: int
    block_ids: list[int]


@dataclass
class PrefillChunk:
    """A multi-token chunk of one sequence, attended on its own.

    Attributes:
        token_start: row of its first token in the step's ``[T]`` input.
        num_new_tokens: rows it owns.
        num_computed_tokens: cached context before the chunk.
        context_block_ids: [num_blocks] blocks covering context + chunk;
            None when there is no cached context (attend to the new K/V).
        mask: [num_new_tokens, num_computed_tokens + num_new_tokens] bool,
            True where a query may attend; None with no cached context.
    """

    token_start: int
    num_new_tokens: int
    num_computed_tokens: int
    context_block_ids: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class DecodeBatch:
    """All single-token sequences of a step, attended in one call.

    Attributes:
        num_seqs: B.
        token_rows: [B] rows of their tokens in ``[T]``; None when the rows
            are the contiguous range ``row_start .. row_start + B``.
        row_start: first row when contiguous.
        block_table: [B * max_blocks] block ids, row-major, padded with
            each row's first block.
        max_blocks: blocks per row of ``block_table``.
        key_mask: [B, 1, 1, max_blocks * block_size] bool, True on real context.
    """

    num_seqs: int
    token_rows: torch.Tensor | None
    row_start: int
    block_table: torch.Tensor
    max_blocks: int
    key_mask: torch.Tensor


@dataclass
class AttentionMetadata:
    """Everything the attention layers need for one step, built once.

    Attributes:
        num_tokens: T, the rows of the step's input.
        block_size: tokens per KV block.
        slot_mapping: [T] cache slot of each new token.
        last_token_rows: [num_seqs] row of each sequence's last new token,
            in batch order (where the runner takes logits).
        prefills: multi-token chunks.
        decode: single-token sequences, or None when there are none.
    """

    num_tokens: int
    block_size: int
    slot_mapping: torch.Tensor
    last_token_rows: torch.Tensor
    prefills: list[PrefillChunk]
    decode: DecodeBatch | None


def build_attention_metadata(seqs: list[SeqSpec], block_size: int, device: torch.device) -> AttentionMetadata:
    """Describe one step's batch to the attention layers.

    Raises:
        ValueError: a sequence with no new tokens or too few blocks (a
            runner bug, not a user error).
    """
    slots: list[int] = []
    last_rows: list[int] = []
    chunk_specs: list[tuple[int, SeqSpec]] = []
    decode_rows: list[int] = []
    decode_blocks: list[list[int]] = []
    decode_lens: list[int] = []
    for i, seq in enumerate(seqs):
        start, n = seq.num_computed_tokens, seq.num_new_tokens
        total = start + n
        if n < 1 or start < 0:
            raise ValueError(f"seqs[{i}]: num_new_tokens={n}, num_computed_tokens={start}")
        num_blocks = -(-total // block_size)
        if len(seq.block_ids) < num_blocks:
            raise ValueError(
                f"seqs[{i}]: {len(seq.block_ids)} blocks cannot hold {total} tokens "
                f"of block_size {block_size}"
            )
        row = len(slots)
        blocks = seq.block_ids
        slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, total))
        last_rows.append(len(slots) - 1)
        if n == 1:
            decode_rows.append(row)
            decode_blocks.append(blocks[:num_blocks])
            decode_lens.append(total)
        else:
            chunk_specs.append((row, seq))

    prefills = [_build_chunk(row, seq, block_size, device) for row, seq in chunk_specs]
    decode = _build_decode(decode_rows, decode_blocks, decode_lens, block_size, device)
    return AttentionMetadata(
        num_tokens=len(slots),
        block_size=block_size,
        slot_mapping=torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True),
        last_token_rows=torch.tensor(last_rows, dtype=torch.long).to(device, non_blocking=True),
        prefills=prefills,
        decode=decode,
    )


def _build_chunk(row: int, seq: SeqSpec, block_size: int, device: torch.device) -> PrefillChunk:
    start, n = seq.num_computed_tokens, seq.num_new_tokens
    if start == 0:
        return PrefillChunk(row, n, 0, None, None)
    total = start + n
    blocks = torch.tensor(seq.block_ids[: -(-total // block_size)], dtype=torch.long)
    # query i sits at position start + i and sees keys 0 .. start + i
    query_pos = torch.arange(start, total, device=device).unsqueeze(1)  # [n, 1]
    key_pos = torch.arange(total, device=device).unsqueeze(0)  # [1, total]
    return PrefillChunk(row, n, start, blocks.to(device, non_blocking=True), key_pos <= query_pos)


def _build_decode(
    rows: list[int],
    blocks: list[list[int]],
    lens: list[int],
    block_size: int,
    device: torch.device,
) -> DecodeBatch | None:
    if not rows:
        return None
    max_blocks = max(len(b) for b in blocks)
    table = [b + [b[0]] * (max_blocks - len(b)) for b in blocks]
    contiguous = rows[-1] - rows[0] == len(rows) - 1
    lens_t = torch.tensor(lens, dtype=torch.long).to(device, non_blocking=True)
    key_pos = torch.arange(max_blocks * block_size, device=device)
    key_mask = (key_pos.unsqueeze(0) < lens_t.unsqueeze(1))[:, None, None, :]
    return DecodeBatch(
        num_seqs=len(rows),
        token_rows=None if contiguous else torch.tensor(rows, dtype=torch.long).to(device),
        row_start=rows[0],
        block_table=torch.tensor(table, dtype=torch.long).view(-1).to(device, non_blocking=True),
        max_blocks=max_blocks,
        key_mask=key_mask,
    )
