"""Vectorized layout of many dialogues at once (the Ray workers' path): the same windows and columns as
``tokenize.split_into_windows`` + ``layout_dialogue`` (the reference, used by the local engine), built with
numpy from flat token arrays instead of per-token Python lists. The engines' byte-identical output is the test.
"""

from __future__ import annotations

import numpy as np

from data_prep.contract import BLK, EOU, INPUT_IDS, LABELS, UTT_IDS
from data_prep.layout import IGNORE
from data_prep.schema import DataError, Dialogue
from data_prep.tokenizer_loading import SpecialIds


def plan_windows(lengths: list[int], seq_len: int) -> list[tuple[int, int]] | int:
    """Utterance ranges ``[a, b)`` of the windows of one dialogue (utterance token counts ``lengths``): split
    at utterance boundaries so that ``[BOS] u EoU ...`` fits ``seq_len``. Returns the index of the first
    utterance that cannot fit a window on its own instead (the caller rejects the dialogue)."""
    for i, n in enumerate(lengths):
        if n + 2 > seq_len:
            return i
    out, a, used = [], 0, 1
    for i, n in enumerate(lengths):
        if used + n + 1 > seq_len:
            out.append((a, i))
            a, used = i, 1
        used += n + 1
    out.append((a, len(lengths)))
    return out


def layout_columns(utt_lens: np.ndarray, tokens: np.ndarray, windows: list[tuple[int, int]], ids: SpecialIds) -> dict:
    """Columns of all ``windows`` (global utterance ranges over ``utt_lens``; ``tokens`` = all utterances'
    tokens back to back), concatenated in window order, plus ``lengths`` (tokens per window) and
    ``utterances`` (per window)."""
    utt_lens = np.asarray(utt_lens, dtype=np.int64)
    if not windows:
        z = np.zeros(0, dtype=np.int32)
        return {INPUT_IDS: z, LABELS: z, UTT_IDS: z, EOU: np.zeros(0, dtype=np.bool_), BLK: z,
                "lengths": np.zeros(0, dtype=np.int64), "utterances": np.zeros(0, dtype=np.int64)}
    a = np.array([w[0] for w in windows], dtype=np.int64)
    b = np.array([w[1] for w in windows], dtype=np.int64)
    n_utts = b - a
    excl = np.concatenate([[0], np.cumsum(utt_lens + 1)])  # exclusive cumsum of (len + 1) over all utterances
    win_len = 1 + excl[b] - excl[a]
    w_start = np.concatenate([[0], np.cumsum(win_len)[:-1]]).astype(np.int64)
    total = int(win_len.sum())
    # the utterances that are in some window (all of them, in order, for a chunk's kept dialogues)
    uidx = np.concatenate([np.arange(x, y) for x, y in zip(a.tolist(), b.tolist())])
    win_of = np.repeat(np.arange(len(windows)), n_utts)
    local = uidx - a[win_of] + 1  # 1-based utterance index inside its window
    content_start = w_start[win_of] + 1 + excl[uidx] - excl[a[win_of]]
    lens = utt_lens[uidx]
    eou_pos = content_start + lens
    tok_start = np.concatenate([[0], np.cumsum(utt_lens)])[uidx]
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    content_pos = np.repeat(content_start, lens) + within
    src_pos = np.repeat(tok_start, lens) + within

    input_ids = np.empty(total, dtype=np.int32)
    input_ids[w_start] = ids.bos
    input_ids[content_pos] = tokens[src_pos]
    input_ids[eou_pos] = ids.eou
    utt = np.zeros(total, dtype=np.int32)
    utt[content_pos] = np.repeat(local, lens)
    utt[eou_pos] = local
    eou = np.zeros(total, dtype=np.bool_)
    eou[eou_pos] = True
    labels = input_ids.copy()
    labels[w_start] = IGNORE
    return {INPUT_IDS: input_ids, LABELS: labels, UTT_IDS: utt, EOU: eou, BLK: utt.copy(),
            "lengths": win_len, "utterances": n_utts}


def too_long(dialogue: Dialogue, lens: list[int], turn: int, seq_len: int, pinned_tokens: int = 0) -> DataError:
    """The ``too_long`` rejection of a dialogue whose ``turn`` cannot fit a window of ``seq_len`` tokens."""
    pin = f", the pinned system turn ({pinned_tokens} tokens)" if pinned_tokens else ""
    return DataError(dialogue.source, dialogue.line, f"turn {turn} has {lens[turn]} tokens; with BOS{pin} and EoU it "
                     f"exceeds seq_len={seq_len}", "too_long")
