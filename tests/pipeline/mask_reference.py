"""The per-element reference every mask is tested against: method.md §2 written as loops over (q, k), with no
code shared with the library's predicates. The sinks of the dialogue, SMR and LMR masks are the keys of utterance 0
in q's dialogue: BOS, plus a pinned system turn when the layout gives it utterance index 0 (issue 11 item 3)."""

from __future__ import annotations

import torch

from pipeline.attention.masks import MaskParams, bigbird_random_keys

COLUMNS = ("doc_ids", "utt_ids", "eou", "blk", "position_ids")


def reference(kind: str, row: dict, params: MaskParams = MaskParams(), rand=None) -> torch.Tensor:
    doc, utt, eou, blk, pos = (row[c].tolist() for c in COLUMNS)
    T = len(doc)
    pinned = {(doc[i], i) for i in range(T) if utt[i] == 0}  # BOS (+ a pinned system turn) of each dialogue
    eou_of_block = {(doc[i], blk[i]): i for i in range(T) if eou[i]}
    m = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(T):
            if not (k <= q and doc[k] == doc[q]):
                continue
            is_sink = (doc[q], k) in pinned
            if kind == "causal":
                ok = True
            elif kind == "dialogue":
                ok = is_sink or eou[k] or utt[k] == utt[q] or utt[k] == utt[q] - 1
            elif kind == "smr":
                copy_q = blk[q] > 0 and blk[q] % 2 == 0
                ok = is_sink or blk[k] == blk[q] or (copy_q and k == eou_of_block.get((doc[q], blk[q] - 1)))
            elif kind == "lmr":
                response_q = utt[q] > 0 and utt[q] % 2 == 0  # query of pair p has utt 2p-1, its response 2p
                in_its_query = blk[k] == blk[q] and utt[k] == utt[q] - 1
                ok = is_sink or eou[k] or utt[k] == utt[q] or (response_q and in_its_query)
            elif kind == "local":
                ok = q - k < params.local_window
            elif kind == "streamingllm":
                ok = pos[k] < params.sink_tokens or q - k < params.sink_window
            elif kind == "bigbird":
                ok = pos[k] < params.bigbird_global or q - k < params.bigbird_window or k in rand[q]
            else:
                raise AssertionError(kind)
            m[q, k] = ok
    return m


def check_against_reference(batch: dict, mask: torch.Tensor, kinds: list[str], params: MaskParams) -> None:
    """``mask`` ``(B, T, T)`` equals the reference of each row's kind; names the first (q, k) that differ."""
    rand = bigbird_random_keys(batch, params.bigbird_random, params.bigbird_seed)
    for b, kind in enumerate(kinds):
        row = {c: batch[c][b] for c in COLUMNS}
        ref = reference(kind, row, params, rand=rand[b].tolist())
        bad = (mask[b] != ref).nonzero()
        assert bad.numel() == 0, f"{kind} row {b}: differs at (q, k) = {bad[:5].tolist()}"
