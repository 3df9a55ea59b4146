"""Read → validate → tokenize → window, one chunk of records at a time (the work the Ray engine spreads out).

The driver ``plan_inputs``: one pass per file for its sha256, format and chunks (byte ranges of
JSON lines with their first line number; a whole-file format such as PersonaChat is split
into records on the driver, which has read the file anyway). A worker ``process_chunk``: reads its byte range,
parses and validates each record, tokenizes all utterances of the chunk in one batched call and lays them out
in windows, giving a *pieces* table (``items.PIECE_SCHEMA``). The result depends on the chunk's records only,
never on which worker ran it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from itertools import chain

import numpy as np
import pyarrow as pa

from data_prep.adapters import (
    WHOLE_FILE_FORMATS,
    adapt_records,
    detect_format_from_line,
    parse_jsonl,
    personachat_dialogue,
    personachat_records,
)
from data_prep.chat_records import ChatMapping
from data_prep.config import DataConfig
from data_prep.chat_template import ChatTurns, chat_columns, chat_windows, encode_dialogue
from data_prep.contract import BLK, DIALOGUE, EOU, INPUT_IDS, LABELS, MASK_KIND, UTT_IDS
from data_prep.items import PieceBuilder, pieces_from_columns
from data_prep.layout import TokenizedDialogue, dialogue_texts, split_into_windows
from data_prep.hf_datasets import DATASETS_READER, dataset_records, is_dataset_input, rows_of_table
from data_prep.schema import DataError
from data_prep.sources import Chunk, canonical_path, display_name, read_bytes, scan
from data_prep.tokenizer_loading import SpecialIds
from data_prep.windows import layout_columns, plan_windows, too_long


@dataclass
class ChunkTask:
    file_index: int
    path: str
    fmt: str
    start: int
    end: int
    first_line: int
    first_record: int
    payload: bytes = b""  # whole-file formats: pickled [(key, turns, line) | DataError]; datasets: Arrow IPC rows
    reader: str = ""  # "datasets": rows [start, end) of a Hugging Face dataset (``hf_datasets``)
    records: int = 0
    nbytes: int = 0  # input bytes the task covers (for whole-file formats an estimate): balances the tasks

    def to_row(self) -> dict:
        return dict(self.__dict__)


def input_metas(paths: list[str], cfg: DataConfig) -> list[dict]:
    """One pass per file on the driver: path, name, sha256, size, resolved format, and (key ``_chunks``, not
    written to the manifest) the byte ranges of its JSON-lines chunks."""
    metas = []
    for path in paths:
        if is_dataset_input(path, cfg.format):
            metas.append(dataset_meta(path, cfg))
            continue
        sc = scan(path, cfg.chunk_records or FINE_CHUNK, cfg.max_dialogues, lines=cfg.format not in WHOLE_FILE_FORMATS)
        if not sc.first_line:  # nothing but whitespace (or a BOM): an error in every mode, never a silent zero
            raise DataError(path, 1, "file is empty: no records", "empty_file")
        fmt = detect_format_from_line(path, sc.first_line) if cfg.format == "auto" else cfg.format
        metas.append({"path": canonical_path(path), "name": display_name(path), "sha256": sc.sha256,
                      "bytes": sc.size, "format": fmt, "_chunks": sc.chunks})
    return metas


def dataset_meta(path: str, cfg: DataConfig) -> dict:
    """The meta of a dataset input: its row ranges are its chunks; the loaded dataset rides along (``_records``)."""
    records = dataset_records(path, cfg.format, ChatMapping.of(cfg))
    rows = records.rows if cfg.max_dialogues is None else min(records.rows, cfg.max_dialogues)
    size = cfg.chunk_records or FINE_CHUNK
    chunks = [Chunk(a, min(a + size, rows), 0, a, min(a + size, rows) - a) for a in range(0, rows, size)]
    return {"path": canonical_path(path), "name": display_name(path), "sha256": records.sha256,
            "bytes": records.dataset.data.nbytes, "format": records.fmt, "reader": DATASETS_READER,
            "rows": records.rows, "_chunks": chunks, "_records": records}


FINE_CHUNK = 16  # records per scanned chunk when data.chunk_records is None (merged into tasks below)
MAX_AUTO_CHUNK = 2048


def chunk_tasks(paths: list[str], metas: list[dict], cfg: DataConfig, workers: int = 1) -> list[ChunkTask]:
    """The chunk tasks of all inputs, in input order. Whole-file formats are split into records here. With
    ``data.chunk_records`` unset, consecutive chunks of a file are merged so that there are about 4 tasks per
    worker of about equal *bytes* (small tasks cost more in scheduling than they do in work, and bytes follow the
    tokenization work better than record counts: an MSC session-3 episode is 1.5x a session-2 one)."""
    size = cfg.chunk_records or FINE_CHUNK
    fine: list[ChunkTask] = []
    for fi, (path, meta) in enumerate(zip(paths, metas)):
        fmt = meta["format"]
        if meta.get("reader") == DATASETS_READER:
            per_row = meta["bytes"] / max(meta["rows"], 1)
            fine += [ChunkTask(fi, path, fmt, c.start, c.end, 0, c.first_record, records=c.records,
                               nbytes=int(per_row * c.records), reader=DATASETS_READER) for c in meta["_chunks"]]
            continue
        if fmt not in WHOLE_FILE_FORMATS:
            fine += [ChunkTask(fi, path, fmt, c.start, c.end, c.first_line, c.first_record, records=c.records,
                               nbytes=c.end - c.start) for c in meta["_chunks"]]
            continue
        data = read_bytes(path)
        records = personachat_records(path, data)
        if cfg.max_dialogues is not None:
            records = records[:cfg.max_dialogues]
        per_record = len(data) / max(len(records), 1)  # bytes, for balancing
        for k in range(0, len(records), size):
            part = records[k:k + size]
            task = ChunkTask(fi, path, fmt, 0, 0, 0, k, records=len(part), nbytes=int(per_record * len(part)))
            task.payload = part  # pickled once the tasks are final (below)
            fine.append(task)
    if cfg.chunk_records is None:
        fine = _merge_by_bytes(fine, workers)
    for t in fine:
        if t.reader == DATASETS_READER:  # the rows travel with the task: workers need not see the driver's disk
            t.payload = arrow_ipc(metas[t.file_index]["_records"].arrow_rows(t.start, t.end))
        elif t.payload:
            t.payload = pickle.dumps(t.payload, protocol=5)
    return fine


def arrow_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _merge_by_bytes(fine: list[ChunkTask], workers: int) -> list[ChunkTask]:
    """Consecutive chunks of one file merged into about 4 tasks per worker of about equal bytes, at most
    ``MAX_AUTO_CHUNK`` records each."""
    target = -(-sum(t.nbytes for t in fine) // (4 * max(workers, 1)))
    merged: list[ChunkTask] = []
    for t in fine:
        last = merged[-1] if merged else None
        if (last is not None and last.file_index == t.file_index and last.nbytes + t.nbytes <= target
                and last.records + t.records <= MAX_AUTO_CHUNK):
            last.payload = last.payload + t.payload  # lists of records (whole-file formats) or b""
            last.end = t.end
            last.records += t.records
            last.nbytes += t.nbytes
        else:
            merged.append(ChunkTask(**t.__dict__))
    return merged


def read_chunk(task: ChunkTask, mapping: ChatMapping):
    """(ordinal, line, Dialogue | DataError) for each record of the chunk, in order."""
    if task.reader == DATASETS_READER:
        rows = rows_of_table(pa.ipc.open_stream(task.payload).read_all(), task.start)
        for k, (line, rec) in enumerate(adapt_records(task.path, task.fmt, rows, mapping)):
            yield task.first_record + k, line, rec
        return
    if task.payload:
        for k, rec in enumerate(pickle.loads(task.payload)):
            if isinstance(rec, DataError):
                yield task.first_record + k, rec.line, rec
                continue
            try:
                yield task.first_record + k, rec[2], personachat_dialogue(task.path, *rec)
            except DataError as e:
                yield task.first_record + k, e.line, e
        return
    data = read_bytes(task.path, task.start, task.end)
    for k, (lineno, rec) in enumerate(parse_jsonl(task.path, task.fmt, data, task.first_line, task.start, mapping)):
        yield task.first_record + k, lineno, rec


def process_chunk(task: ChunkTask, encode, ids: SpecialIds, cfg: DataConfig) -> pa.Table:
    """Read, validate, tokenize (one batched call) and window the records of one chunk → pieces table
    (numpy layout, ``windows.layout_columns``)."""
    records = chat_records(list(read_chunk(task, ChatMapping.of(cfg))), ids.chat)
    texts = [dialogue_texts(d, cfg.speaker_tags) for _, _, d in records if not isinstance(d, (DataError, ChatTurns))]
    flat = encode([t for ts in texts for t in ts])
    name = display_name(task.path)
    scalars, row_lengths, windows, kept_lens, kept_utts = [], [], [], [], []
    flags, eou_flags, pin = [], [], []
    k = 0
    for ordinal, line, rec in records:
        base = {"file_index": task.file_index, "ordinal": ordinal, "source": task.path}
        if isinstance(rec, DataError):
            scalars.append(base | _rejected(rec))
            row_lengths.append(0)
            continue
        if isinstance(rec, ChatTurns):
            turns, rec = rec, rec.dialogue
            lens = [len(u) for u in turns.utterances]
            laid = chat_windows(turns, ids.chat, cfg.seq_len)
            plan = laid if isinstance(laid, tuple) else laid.plan
        else:
            laid, utts = None, flat[k:k + len(rec.turns)]
            k += len(rec.turns)
            lens = [len(u) for u in utts]
            plan = plan_windows(lens, cfg.seq_len)
            plan = (plan, 0) if isinstance(plan, int) else plan
        if isinstance(plan, tuple):
            scalars.append(base | _rejected(too_long(rec, lens, plan[0], cfg.seq_len, plan[1]),
                                            tokens=1 + sum(n + 1 for n in lens)))
            row_lengths.append(0)
            continue
        if laid is not None:  # the chat layout: a pinned system turn repeated at the head of each window
            utts = laid.utterances
            flags += [f for fs in laid.supervised for f in fs]
            eou_flags += laid.eou_supervised
            pin += laid.pin
        lens = [len(u) for u in utts]
        first = len(kept_lens)
        kept_lens += lens
        kept_utts += utts
        for w, (a, b) in enumerate(plan):
            windows.append((first + a, first + b))
            scalars.append(base | {"line": str(rec.line), "error": "", "code": "", "window": w, "windows": len(plan),
                                   "utterances": b - a, "tokens_rejected": 0, "dialogue_id": f"{name}:{rec.id}",
                                   MASK_KIND: DIALOGUE, "supervised_by_role": ""})
            row_lengths.append(1 + sum(kept_lens[first + a:first + b]) + (b - a))
    tokens = np.fromiter(chain.from_iterable(kept_utts), dtype=np.int32, count=sum(kept_lens))
    cols = layout_columns(np.asarray(kept_lens, dtype=np.int64), tokens, windows, ids)
    if ids.chat is not None:
        cols = chat_columns(cols, np.asarray(kept_lens, dtype=np.int64), flags, eou_flags, windows, pin)
        for row, counts in zip((r for r in scalars if r["error"] == ""), cols["supervised_by_role"]):
            row["supervised_by_role"] = counts
    return pieces_from_columns(scalars, row_lengths, cols)


def chat_records(records: list, spec) -> list:
    """With a chat layout, each dialogue rendered by its template (a ``ChatTurns`` carrying its ``dialogue``; a turn
    the template cannot render becomes the record's DataError); the records unchanged otherwise."""
    if spec is None:
        return records
    out = []
    for ordinal, line, rec in records:
        if not isinstance(rec, DataError):
            try:
                turns = encode_dialogue(spec, rec)
                turns.dialogue, rec = rec, turns
            except DataError as e:
                rec = e
        out.append((ordinal, line, rec))
    return out


def _rejected(err: DataError, tokens: int = 0) -> dict:
    return {"line": str(err.line), "source": err.source, "error": err.reason, "code": err.code, "window": 0,
            "windows": 0, "utterances": 0, "tokens_rejected": tokens, "dialogue_id": "", MASK_KIND: "",
            "supervised_by_role": ""}


def keep_or_reject(out: PieceBuilder, file_index: int, ordinal: int, line, name: str, dialogue, utterances,
                   ids: SpecialIds, seq_len: int) -> None:
    """Window a tokenized dialogue (ids name their file: MSC episodes recur across session files), or reject
    it with its token count when an utterance cannot fit a sequence."""
    if ids.chat is not None:
        _keep_or_reject_chat(out, file_index, ordinal, line, name, dialogue, ids, seq_len)
        return
    try:
        windows = split_into_windows(dialogue, utterances, ids, seq_len)
    except DataError as e:
        out.reject(file_index, ordinal, e, tokens=1 + sum(len(u) + 1 for u in utterances))
        return
    for w in windows:
        w.dialogue_id = f"{name}:{dialogue.id}"
    out.keep(file_index, ordinal, line, dialogue.source, windows)


def _keep_or_reject_chat(out: PieceBuilder, file_index: int, ordinal: int, line, name: str, dialogue,
                         ids: SpecialIds, seq_len: int) -> None:
    """``keep_or_reject`` with the chat layout (the same column code as the Ray engine's ``process_chunk``)."""
    try:
        turns = encode_dialogue(ids.chat, dialogue)
    except DataError as e:
        out.reject(file_index, ordinal, e)
        return
    laid = chat_windows(turns, ids.chat, seq_len)
    if isinstance(laid, tuple):
        lens = [len(u) for u in turns.utterances]
        out.reject(file_index, ordinal, too_long(dialogue, lens, laid[0], seq_len, laid[1]),
                   tokens=1 + sum(n + 1 for n in lens))
        return
    lens, plan = [len(u) for u in laid.utterances], laid.plan
    tokens = np.fromiter(chain.from_iterable(laid.utterances), dtype=np.int32, count=sum(lens))
    cols = chat_columns(layout_columns(np.asarray(lens, dtype=np.int64), tokens, plan, ids), np.asarray(lens),
                        [f for fs in laid.supervised for f in fs], laid.eou_supervised, plan, laid.pin)
    ends = np.cumsum(cols["lengths"])
    windows = []
    for w, ((a, b), stop) in enumerate(zip(plan, ends)):
        cut = {c: cols[c][stop - cols["lengths"][w]:stop].tolist() for c in (INPUT_IDS, LABELS, UTT_IDS, EOU, BLK)}
        windows.append(TokenizedDialogue(f"{name}:{dialogue.id}", cut[INPUT_IDS], cut[LABELS], cut[UTT_IDS],
                                         [bool(x) for x in cut[EOU]], cut[BLK], DIALOGUE, w, cols["supervised_by_role"][w]))
    out.keep(file_index, ordinal, line, dialogue.source, windows)
