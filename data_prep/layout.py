"""Dialogue → token ids + per-token metadata, per method.md §1.

    [BOS] u1 EoU u2 EoU ... un EoU

    token     BOS  u1 u1 EoU  u2 u2 u2 EoU
    utt         0   1  1   1   2  2  2   2     (an utterance and its EoU share an index)
    eou         0   0  0   1   0  0  0   1
    position    0   1  2   3   4  5  6   7     (restart at 0 for every dialogue of a pack)
"""

from __future__ import annotations

from dataclasses import dataclass

from data_prep.contract import DIALOGUE, IGNORE
from data_prep.schema import Dialogue
from data_prep.tokenizer_loading import SpecialIds, encode_utterances


@dataclass
class TokenizedDialogue:
    """One dialogue (or one window of a long dialogue) as flat lists of equal length."""

    dialogue_id: str
    input_ids: list[int]
    labels: list[int]
    utt_ids: list[int]
    eou: list[bool]
    blk: list[int]
    mask_kind: str = DIALOGUE
    window: int = 0  # index of this window inside its dialogue (0 unless split)
    supervised_by_role: str = ""  # template=chat: JSON role -> tokens with loss (the manifest's per-role counts)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_utterances(self) -> int:
        return sum(self.eou)


def dialogue_texts(dialogue: Dialogue, speaker_tags: bool = False) -> list[str]:
    return [f"{t.speaker}: {t.text}" if speaker_tags and t.speaker else t.text for t in dialogue.turns]


def utterance_token_ids(dialogue: Dialogue, tokenizer, speaker_tags: bool = False) -> list[list[int]]:
    """Tokenize each utterance without special tokens (one batched tokenizer call)."""
    return encode_utterances(tokenizer, dialogue_texts(dialogue, speaker_tags))


class FastEncoder:
    """The Rust tokenizer behind a saved Hugging Face fast tokenizer (``tokenizer.json``), without importing
    transformers (or torch): loads in ~0.2 s and encodes large batches with no Python per-token work. Gives the
    same ids as ``AutoTokenizer(...)(texts, add_special_tokens=False)`` (tested); falls back to transformers
    for tokenizers without a ``tokenizer.json``."""

    def __init__(self, tokenizer_dir: str):
        import os

        path = os.path.join(tokenizer_dir, "tokenizer.json")
        if os.path.isfile(path):
            from tokenizers import Tokenizer

            self._raw, self._hf = Tokenizer.from_file(path), None
            self._plain_text(self._raw)
        else:
            from transformers import AutoTokenizer

            self._raw, self._hf = None, AutoTokenizer.from_pretrained(tokenizer_dir)

    @classmethod
    def from_json(cls, tokenizer_json: str) -> "FastEncoder":
        """From the text of a ``tokenizer.json`` (shipped to Ray workers that do not share the driver's disk)."""
        from tokenizers import Tokenizer

        enc = cls.__new__(cls)
        enc._raw, enc._hf = Tokenizer.from_str(tokenizer_json), None
        cls._plain_text(enc._raw)
        return enc

    @staticmethod
    def _plain_text(raw) -> None:
        """No truncation, no padding, and special-token text encoded as text (as ``encode_utterances``)."""
        raw.no_truncation()
        raw.no_padding()
        raw.encode_special_tokens = True

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._raw is not None:
            return [e.ids for e in self._raw.encode_batch(texts, add_special_tokens=False)]
        return encode_utterances(self._hf, texts)


def layout_dialogue(dialogue_id: str, utterances: list[list[int]], ids: SpecialIds, window: int = 0,
                    system: list[int] | None = None) -> TokenizedDialogue:
    """Lay out ``[BOS] u1 EoU ... un EoU`` with metadata; loss on every token but BOS. With ``system`` (a pinned
    system turn, ``data.pin_system``): ``[BOS] system EoU u1 EoU ...``, the prefix all utterance 0 and without loss."""
    input_ids, utt, eou = [ids.bos], [0], [False]
    if system is not None:
        input_ids += list(system) + [ids.eou]
        utt += [0] * (len(system) + 1)
        eou += [False] * len(system) + [True]
    pinned = len(input_ids)
    for i, u in enumerate(utterances, start=1):
        input_ids += list(u) + [ids.eou]
        utt += [i] * (len(u) + 1)
        eou += [False] * len(u) + [True]
    labels = [IGNORE] * pinned + input_ids[pinned:]
    return TokenizedDialogue(dialogue_id, input_ids, labels, utt, eou, list(utt), DIALOGUE, window)


def split_into_windows(dialogue: Dialogue, utterances: list[list[int]], ids: SpecialIds, seq_len: int) -> list[TokenizedDialogue]:
    """Lay out a dialogue; if it is longer than ``seq_len``, split it at utterance boundaries into consecutive
    windows that each start with BOS and restart utterance indices and positions (the model sees nothing of
    earlier windows). An utterance that cannot fit a window on its own is a DataError."""
    from data_prep.windows import too_long  # windows imports this module

    for i, u in enumerate(utterances):
        if len(u) + 2 > seq_len:
            raise too_long(dialogue, [len(x) for x in utterances], i, seq_len)
    windows, current, used = [], [], 1
    for u in utterances:
        if used + len(u) + 1 > seq_len:
            windows.append(current)
            current, used = [], 1
        current.append(u)
        used += len(u) + 1
    windows.append(current)
    return [layout_dialogue(dialogue.id, w, ids, window=k) for k, w in enumerate(windows)]
