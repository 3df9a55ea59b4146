"""The batch contract, data side: the names every stage shares, spelled out here and nowhere else.

Prep writes shard rows with these columns, the trainer reads them into batches, the masks read the metadata,
the losses read the labels. One packed row of ``seq_len`` tokens (two dialogues and padding)::

    column        BOS u1 u1 EoU u2 EoU  BOS u1 EoU  pad pad
    input_ids       1  7  9   2  4   2    1  5   2    0   0
    labels       -100  7  9   2  4   2 -100  5   2 -100 -100   (-100 = no loss)
    position_ids    0  1  2   3  4   5    0  1   2    0   0    (restart per dialogue)
    doc_ids         0  0  0   0  0   0    1  1   1   -1  -1    (-1 = padding)
    utt_ids         0  1  1   1  2   2    0  1   1   -1  -1    (BOS is 0; an utterance and its EoU share one)
    eou             0  0  0   1  0   1    0  0   1    0   0
    blk             0  1  1   1  2   2    0  1   1   -1  -1    (SMR/LMR block; else = utt_ids)

plus ``mask_kind`` (one per row) and ``dialogue_ids`` (the source ids of the packed dialogues). ``pipeline.contract``
adds what only the pipeline needs (the torch batch, cache policies, the exported folder's ``convsink.json``);
the one-way dependency ``pipeline`` → ``data_prep`` is why these names live here.
"""

from __future__ import annotations

import pyarrow as pa

IGNORE = -100  # label of a position that carries no loss

# -- mask kinds: every row of a shard has one; the tasks are the kinds training learns from ----------------------
DIALOGUE = "dialogue"  # a (packed) dialogue under the dialogue mask
SMR = "smr"  # short-memory reconstruction: original / copy blocks
LMR = "lmr"  # long-memory reactivation: query/response pairs and a recalled one
TASKS = (DIALOGUE, SMR, LMR)  # one loss each (loss/dialogue, loss/smr, loss/lmr)
CAUSAL, LOCAL, STREAMINGLLM, BIGBIRD = "causal", "local", "streamingllm", "bigbird"
BASELINE_MASKS = (CAUSAL, LOCAL, STREAMINGLLM, BIGBIRD)  # the paper's comparison masks, applied to dialogue rows
MASK_KINDS = TASKS + BASELINE_MASKS
DIALOGUE_ROW_MASKS = (DIALOGUE,) + BASELINE_MASKS  # what ``model.mask.dialogue_kind`` may apply to dialogue rows

# -- chat roles: every chat-format adapter normalises a turn's speaker to one of these -----------------------------
SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"
ROLES = (SYSTEM, USER, ASSISTANT, TOOL)

# -- training stages: which mask kinds each stage reads ------------------------------------------------------------
MEMORY_STAGE, DIALOGUE_STAGE = "memory", "dialogue"
STAGE_KINDS = {MEMORY_STAGE: (SMR, LMR), DIALOGUE_STAGE: (DIALOGUE,)}  # in the order `convsink run` trains them
STAGES = tuple(STAGE_KINDS)

# -- shard columns --------------------------------------------------------------------------------------------------
INPUT_IDS, LABELS, POSITION_IDS = "input_ids", "labels", "position_ids"
DOC_IDS, UTT_IDS, EOU, BLK = "doc_ids", "utt_ids", "eou", "blk"
MASK_KIND, DIALOGUE_IDS = "mask_kind", "dialogue_ids"
TENSOR_COLUMNS = (INPUT_IDS, LABELS, POSITION_IDS, DOC_IDS, UTT_IDS, EOU, BLK)  # (N, seq_len) each
META_COLUMNS = (DOC_IDS, UTT_IDS, EOU, BLK, POSITION_IDS)  # what the masks read
PAD_VALUES = {LABELS: IGNORE, POSITION_IDS: 0, DOC_IDS: -1, UTT_IDS: -1, EOU: False, BLK: -1}  # input_ids: pad id

SHARD_SCHEMA = pa.schema([
    *[(c, pa.list_(pa.bool_() if c == EOU else pa.int32())) for c in TENSOR_COLUMNS],
    (MASK_KIND, pa.string()),
    (DIALOGUE_IDS, pa.list_(pa.string())),
])
