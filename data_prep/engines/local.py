"""The single-process reference loop (``engine: local``): one record after the other, one tokenizer call per
dialogue, then the shared memory-task builders and shard encoder in this process. It is the reference the
Ray engine must reproduce byte for byte, and the baseline of ``convsink bench prep``."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from data_prep.adapters import dataset_dialogues, iter_dialogues
from data_prep.chat_records import ChatMapping
from data_prep.config import DataConfig
from data_prep.items import PieceBuilder
from data_prep.layout import utterance_token_ids
from data_prep.reader import keep_or_reject
from data_prep.schema import DataError
from data_prep.sources import display_name
from data_prep.tokenizer_loading import SpecialIds


class LocalEngine:
    name = "local"

    def __init__(self, cfg: DataConfig, tokenizer, tokenizer_dir: str, ids: SpecialIds):
        self.cfg, self.tokenizer, self.ids = cfg, tokenizer, ids

    def pieces(self, paths: list[str], metas: list[dict]) -> Iterator[pa.Table]:
        """Pieces tables in input order (one per file)."""
        cfg, mapping = self.cfg, ChatMapping.of(self.cfg)
        for fi, (path, meta) in enumerate(zip(paths, metas)):
            out = PieceBuilder()
            name = display_name(path)
            records = meta.get("_records")  # a Hugging Face dataset, loaded by the driver
            stream = iter_dialogues(path, meta["format"], mapping) if records is None else dataset_dialogues(records, mapping)
            for ordinal, rec in enumerate(stream):
                if cfg.max_dialogues is not None and ordinal >= cfg.max_dialogues:
                    break
                if isinstance(rec, DataError):
                    out.reject(fi, ordinal, rec)
                    if cfg.on_bad_record == "error":
                        break  # the driver raises it; nothing after it matters
                    continue
                utts = utterance_token_ids(rec, self.tokenizer, cfg.speaker_tags)
                keep_or_reject(out, fi, ordinal, rec.line, name, rec, utts, self.ids, cfg.seq_len)
            yield out.table()

    def map(self, fn, jobs: list, **kwargs) -> Iterator:
        """``fn(job, **kwargs)`` for each job, in order."""
        for job in jobs:
            yield fn(job, **kwargs)

    def close(self) -> None:
        pass
