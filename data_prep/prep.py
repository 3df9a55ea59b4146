"""Data preparation: inputs → validated, tokenized, windowed dialogues (+ SMR/LMR samples) → packed Parquet shards
+ ``manifest.json``.

    prepare(inputs, out, cfg)  # the entry point of `convsink prep` and of `python -m ray_jobs.prep`

Steps: resolve inputs (paths, globs, URIs) → hash them (fingerprint; an output with the same fingerprint is
reused once its shards match the manifest's sizes and sha256; one of another fingerprint is refused, as it may be in
use, unless ``overwrite``) → read/validate/tokenize/window on the chosen engine (``ray``: Ray Data, ``local``: the single-process
reference loop; same bytes out) → memory-task samples → packing plan (``packing.pack_bins``) → shards → manifest.

The output folder is written under a temporary name and renamed when complete, so an interrupted or failed
prep never leaves a folder with a manifest. The manifest depends only on the inputs, the output-relevant config
and the tokenizer (not on the engine or the number of workers); timings go to ``run.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.config import DataConfig
from data_prep.duplicate_ids import DuplicateIds
from data_prep.contract import DIALOGUE, EOU, INPUT_IDS, LMR, SMR, TASKS, UTT_IDS
from data_prep.items import ITEM_SCHEMA
from data_prep.memory_tasks import Corpus, build_lmr, build_smr, lmr_ineligible, smr_plan
from data_prep.packing import pack_bins
from data_prep.paths import folder_written_atomically
from data_prep.piece_store import StoredItems, concat_pieces, dialogue_items, item_lengths, piece_lengths, resolve_items
from data_prep.progress import Progress
from data_prep.reader import input_metas
from data_prep.schema import DataError
from data_prep.shards import MANIFEST, ShardIntegrityError, encode_shard, read_manifest, verify_shards
from data_prep.sources import is_uri, resolve_inputs
from data_prep.tokenizer_loading import layout_ids, load_tokenizer

FORMAT_VERSION = 3  # 3: strict UTF-8, typed fields, duplicate ids rejected, special-token text kept as text
EXECUTION_FIELDS = ("engine", "workers", "chunk_records", "memory_chunk")  # never change the output


def output_config(cfg: DataConfig) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in EXECUTION_FIELDS}


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.all_special_tokens]).encode()).hexdigest()


def fingerprint(metas: list[dict], cfg: DataConfig, tok_digest: str) -> str:
    payload = {"inputs": [(m["name"], m["sha256"], m["format"]) for m in metas], "config": output_config(cfg),
               "tokenizer": tok_digest, "format_version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _existing_fingerprint(out: str) -> str | None:
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _reusable_output(out: str, fp: str, overwrite: bool) -> dict | None:
    """The manifest of ``out`` when it holds this fingerprint's output, intact (every shard's size and sha256);
    None when ``out`` may be written. Never removes anything: another fingerprint's output (perhaps read by a
    training run) is refused unless ``overwrite``; a non-empty folder that is not prep's is always refused."""
    existing = _existing_fingerprint(out)
    if existing == fp:
        try:
            return verify_shards(out, read_manifest(out))
        except ShardIntegrityError:
            if not overwrite:
                raise
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, MANIFEST)):
            raise FileExistsError(f"{out}: exists, is not empty and is not a convsink shard folder; choose another --out")
        if not overwrite:  # it may be in use by a training run: never removed unless asked
            raise FileExistsError(f"{out}: holds shards of another fingerprint ({existing or 'unreadable manifest'}, "
                                  f"this prep is {fp}); choose another --out, or pass --overwrite to replace it")
    return None


def prepare(inputs: list[str], out: str, cfg: DataConfig, progress: bool = True, overwrite: bool = False) -> dict:
    """Prepare shards from ``inputs`` (paths, glob patterns or URIs) into the local folder ``out``; return the
    manifest. An ``out`` of the same fingerprint is reused once every shard matches its manifest (size, sha256);
    one of another fingerprint is replaced only with ``overwrite``; a folder that is not prep's is never touched."""
    if is_uri(out):
        raise ValueError(f"{out}: --out must be a local (or mounted shared) folder")
    paths = resolve_inputs(list(inputs))
    if not paths:
        raise ValueError("no input files given")
    tokenizer = load_tokenizer(cfg.tokenizer)
    ids = layout_ids(tokenizer, cfg)
    metas = input_metas(paths, cfg)
    digest = tokenizer_digest(tokenizer)
    fp = fingerprint(metas, cfg, digest)
    reused = _reusable_output(out, fp, overwrite)
    if reused is not None:
        return reused

    with folder_written_atomically(out) as tmp:
        manifest = _prepare_into(paths, metas, tmp, cfg, tokenizer, ids, fp, digest, progress)
    return manifest


def make_engine(cfg: DataConfig, tokenizer, tokenizer_dir: str, ids):
    if cfg.engine == "ray":
        from data_prep.engines.ray_data import RayEngine

        return RayEngine(cfg, tokenizer, tokenizer_dir, ids)
    from data_prep.engines.local import LocalEngine

    return LocalEngine(cfg, tokenizer, tokenizer_dir, ids)


# ---------------------------------------------------------------------------------------------- collection


def collect(stream, cfg: DataConfig, bar: Progress) -> pa.Table:
    """All pieces, in input order, a repeated dialogue id of a file rejected. In ``error`` mode the first bad
    record (in input order) raises."""
    tables, duplicates = [], DuplicateIds()
    for table in stream:
        if table.num_rows == 0:
            continue
        table = duplicates.reject_repeats(table)
        if cfg.on_bad_record == "error":
            bad = pc.not_equal(table["error"], "")
            if pc.any(bad).as_py():
                row = table.filter(bad).slice(0, 1).to_pylist()[0]
                line = int(row["line"]) if row["line"].isdigit() else row["line"]
                raise DataError(row["source"], line, row["error"], row["code"])
        tables.append(table)
        bar.update(int(pc.sum(pc.equal(table["window"], 0)).as_py() or 0), int(piece_lengths(table).sum()))
    if not tables:
        from data_prep.items import PIECE_SCHEMA

        return PIECE_SCHEMA.empty_table()
    return concat_pieces(tables)


def split_windows(counts: dict) -> int:
    """Windows of the dialogues that were split (every other kept dialogue is one window)."""
    return counts["windows"] - (counts["dialogues"] - counts["dialogues_split"])


def _count(pieces: pa.Table, metas: list[dict]) -> tuple[dict, list[dict]]:
    """Counts over the pieces: every record is kept or rejected; every token is in a window or rejected."""
    error = pieces["error"].to_numpy(zero_copy_only=False)
    rejected = error != ""
    kept = ~rejected
    window = pieces["window"].to_numpy()
    first = window == 0
    lengths = piece_lengths(pieces)
    fi = pieces["file_index"].to_numpy()
    n_windows = pieces["windows"].to_numpy()
    dialogues = int((kept & first).sum())
    windows = int(kept.sum())
    tokens_out = int(lengths[kept].sum())
    codes = pieces["code"].to_numpy(zero_copy_only=False)[rejected]
    split = int((kept & first & (n_windows > 1)).sum())
    counts = {
        "records": int(first.sum()),
        "dialogues": dialogues,
        "rejected": int(rejected.sum()),
        "rejected_by_reason": {c: int((codes == c).sum()) for c in sorted(set(codes.tolist()))},
        "split_dialogues": split,
        "dialogues_split": split,  # the same number under the name (split_dialogues kept for readers of it)
        "dialogue_tokens": length_distribution(_dialogue_tokens(lengths[kept], first[kept])),
        "windows": windows,
        "utterances": int(pieces["utterances"].to_numpy()[kept].sum()),
        "tokens_in": tokens_out - (windows - dialogues),
        "split_bos_tokens": windows - dialogues,
        "tokens_out": tokens_out,
        "tokens_rejected": int(pieces["tokens_rejected"].to_numpy().sum()),
    }
    per_input = []
    for i, m in enumerate(metas):
        mine = fi == i
        per_input.append({k: v for k, v in m.items() if not k.startswith("_")} | {
            "records": int((mine & first).sum()), "kept": int((mine & first & kept).sum()),
            "rejected": int((mine & rejected).sum()), "tokens_out": int(lengths[mine & kept].sum())})
    return counts, per_input


def _dialogue_tokens(window_lengths: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Whole-dialogue token counts (``[BOS] u1 EoU ... un EoU``) from its windows' lengths (one BOS per extra window)."""
    if not len(window_lengths):
        return np.zeros(0, np.int64)
    dialogue = np.cumsum(first) - 1
    return np.bincount(dialogue, weights=window_lengths - 1).astype(np.int64) + 1


def length_distribution(lengths: np.ndarray) -> dict:
    """min, nearest-rank p50/p90/p99, max, and a histogram {"<=2^k": count of lengths in (2^(k-1), 2^k]}."""
    if not len(lengths):
        return {}
    s = np.sort(lengths)
    ranks = {f"p{q}": int(s[int(np.ceil(q / 100 * len(s))) - 1]) for q in (50, 90, 99)}
    buckets = np.maximum(s - 1, 0)
    keys, n = np.unique([1 << int(b).bit_length() for b in buckets], return_counts=True)
    return {"min": int(s[0]), **ranks, "max": int(s[-1]), "histogram": {f"<={k}": int(c) for k, c in zip(keys, n)}}


def supervised_by_role(pieces: pa.Table) -> dict:
    """template=chat: tokens with loss per role over the kept dialogue windows."""
    total: dict = {}
    for text in pieces["supervised_by_role"].to_pylist():
        for role, n in (json.loads(text) if text else {}).items():
            total[role] = total.get(role, 0) + n
    return dict(sorted(total.items()))


def _rejected_records(pieces: pa.Table) -> list[dict]:
    bad = pieces.filter(pc.not_equal(pieces["error"], "")).select(["source", "line", "code", "error", "tokens_rejected"])
    out = []
    for r in bad.to_pylist():
        line = int(r["line"]) if r["line"].isdigit() else r["line"]
        out.append({"source": r["source"], "line": line, "code": r["code"], "reason": r["error"],
                    "tokens": r["tokens_rejected"]})
    return out


def corpus_of(items: pa.Table, window: np.ndarray) -> Corpus:
    """The kept dialogues' utterances (windows joined back), for the memory tasks."""
    ids = items[INPUT_IDS].combine_chunks().flatten().to_numpy()
    utt = items[UTT_IDS].combine_chunks().flatten().to_numpy()
    eou = items[EOU].combine_chunks().flatten().to_numpy(zero_copy_only=False) & (utt > 0)  # a pinned turn's: no
    content = (utt > 0) & ~eou
    ends = np.nonzero(eou)[0]
    csum = np.cumsum(content)
    utt_offsets = np.concatenate([[0], csum[ends]]).astype(np.int64)
    win_eou = np.add.reduceat(eou.astype(np.int64), _starts(items)) if items.num_rows else np.zeros(0, np.int64)
    dial_id = np.cumsum(window == 0) - 1
    per_dial = np.bincount(dial_id, weights=win_eou, minlength=int(dial_id[-1]) + 1 if len(dial_id) else 0)
    dial_offsets = np.concatenate([[0], np.cumsum(per_dial)]).astype(np.int64)
    return Corpus(ids[content].astype(np.int32), utt_offsets, dial_offsets)


def _starts(items: pa.Table) -> np.ndarray:
    return items[INPUT_IDS].combine_chunks().offsets.to_numpy()[:-1]


# ---------------------------------------------------------------------------------------------- jobs (run on workers)


def _memory_job(job, corpus: Corpus, cfg: dict, ids, seq_len: int, seed: int, plan=None):
    kind, start, stop = job
    conf = DataConfig.model_validate(cfg)
    if kind == SMR:
        return build_smr(corpus, conf.smr, ids, seq_len, seed, start, stop, plan)
    return build_lmr(corpus, conf.lmr, ids, seq_len, seed, start, stop)


def _shard_job(job, seq_len: int, pad_id: int, refs=None):
    name, items, row_of_item = job
    data, entry = encode_shard(name, resolve_items(items, refs), row_of_item, seq_len, pad_id)
    return name, data, entry


# ---------------------------------------------------------------------------------------------- the run


def _memory_items(engine, items: pa.Table, window: np.ndarray, cfg: DataConfig, ids) -> tuple[dict, dict]:
    out, stats = {}, {}
    if cfg.smr.samples == 0 and cfg.lmr.samples == 0:
        return out, stats
    corpus = corpus_of(items.materialize() if isinstance(items, StoredItems) else items, window)
    plan = smr_plan(corpus, cfg.seq_len, cfg.smr.max_utterance_tokens)
    stats.update(memory_pool_dialogues=corpus.num_dialogues, smr_long_utterances=plan["long_utterances"],
                 lmr_ineligible_dialogues=lmr_ineligible(corpus))
    for kind, n in ((SMR, cfg.smr.samples), (LMR, cfg.lmr.samples)):
        if n == 0:
            continue
        jobs = [(kind, a, min(a + cfg.memory_chunk, n)) for a in range(0, n, cfg.memory_chunk)]
        tables = []
        for table, st in engine.map(_memory_job, jobs, corpus=corpus, cfg=cfg.model_dump(mode="json"), ids=ids,
                                    seq_len=cfg.seq_len, seed=cfg.seed, plan=plan if kind == SMR else None):
            tables.append(table)
            for k, v in st.items():
                stats[k] = stats.get(k, 0) + v
        out[kind] = pa.concat_tables(tables) if tables else ITEM_SCHEMA.empty_table()
    return out, stats


def _shard_jobs(kind: str, items, cfg: DataConfig) -> tuple[list, dict]:
    lengths = item_lengths(items)
    bins = pack_bins(lengths, cfg.seq_len, cfg.packing, items["dialogue_id"].to_pylist())
    jobs = []
    for k in range(0, len(bins), cfg.shard_rows):
        part = bins[k:k + cfg.shard_rows]
        order = np.array([i for b in part for i in b], dtype=np.int64)
        row_of_item = np.repeat(np.arange(len(part)), [len(b) for b in part])
        jobs.append((f"{kind}-{k // cfg.shard_rows:05d}.parquet", items.take(order), row_of_item))
    tokens = int(sum(lengths))
    slots = len(bins) * cfg.seq_len
    return jobs, {"items": len(lengths), "sequences": len(bins), "tokens": tokens, "pad_tokens": slots - tokens,
                  "packing_efficiency": round(tokens / slots, 6) if slots else 0.0}


def _prepare_into(paths, metas, tmp, cfg: DataConfig, tokenizer, ids, fp, digest, progress) -> dict:
    t0 = time.perf_counter()
    tokenizer_dir = os.path.join(tmp, "tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    engine = make_engine(cfg, tokenizer, tokenizer_dir, ids)
    timing = {"engine": cfg.engine, "workers": getattr(engine, "workers", 1),
              "ray_init_seconds": round(getattr(engine, "init_seconds", 0.0), 3)}
    bar = Progress(enabled=progress, desc=f"prep ({cfg.engine})")
    try:
        pieces = collect(engine.pieces(paths, metas), cfg, bar)
    finally:
        bar.close()
    timing["read_tokenize_seconds"] = round(time.perf_counter() - t0, 3)
    counts, per_input = _count(pieces, metas)
    if cfg.template == "chat":
        counts["supervised_tokens_by_role"] = supervised_by_role(pieces)
    if cfg.on_bad_record == "error":
        for m in per_input:
            if m["records"] and m["kept"] == 0:
                raise DataError(m["path"], 1, "no usable dialogue in this file", "no_usable_dialogue")
    if counts["dialogues"] == 0:
        raise ValueError(f"no dialogues left to pack from {len(paths)} input(s) ({counts['rejected']} rejected)")

    kept = pieces.filter(pc.equal(pieces["error"], ""))
    window = kept["window"].to_numpy()
    items = {DIALOGUE: dialogue_items(kept, getattr(engine, "item_refs", None))}
    t1 = time.perf_counter()
    memory, memory_stats = _memory_items(engine, items[DIALOGUE], window, cfg, ids)
    items.update(memory)
    counts.update(memory_stats)
    timing["memory_seconds"] = round(time.perf_counter() - t1, 3)

    t2 = time.perf_counter()
    shards, packing, jobs = [], {}, []
    for kind in TASKS:
        if kind in items and items[kind].num_rows:
            kind_jobs, packing[kind] = _shard_jobs(kind, items[kind], cfg)
            jobs += kind_jobs
    timing["plan_seconds"] = round(time.perf_counter() - t2, 3)
    t3 = time.perf_counter()
    for name, data, entry in engine.map(_shard_job, jobs, seq_len=cfg.seq_len, pad_id=ids.pad,
                                        refs=getattr(engine, "item_refs", None)):
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
        shards.append(entry)
    timing["write_seconds"] = round(time.perf_counter() - t3, 3)

    rejected = _rejected_records(pieces)
    if rejected:
        with open(os.path.join(tmp, "rejected.jsonl"), "w") as f:
            for r in rejected:
                f.write(json.dumps(r) + "\n")
    d = packing[DIALOGUE]
    counts.update(sequences=d["sequences"], pad_tokens=d["pad_tokens"], packing_efficiency=d["packing_efficiency"],
                  rows_all_kinds=sum(p["sequences"] for p in packing.values()),
                  tokens_by_kind={k: p["tokens"] for k, p in packing.items()})
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "inputs": per_input,
        "config": output_config(cfg),
        "tokenizer": {"spec": output_config(cfg)["tokenizer"], "bos_id": ids.bos, "eou_id": ids.eou, "pad_id": ids.pad,
                      "vocab_size": len(tokenizer), "sha256": digest},
        "seq_len": cfg.seq_len,
        "counts": counts,
        "packing": packing,
        "shards": shards,
        "rejected_file": "rejected.jsonl" if rejected else None,
    }
    elapsed = time.perf_counter() - t0
    timing["seconds"] = round(elapsed, 3)
    timing["tokens_per_s"] = round(counts["tokens_out"] / max(elapsed, 1e-9), 1)
    timing["records_per_s"] = round(counts["records"] / max(elapsed, 1e-9), 1)
    with open(os.path.join(tmp, "run.json"), "w") as f:  # not part of the manifest: differs run to run
        json.dump(timing, f, indent=2)
    with open(os.path.join(tmp, MANIFEST), "w") as f:  # written last: its presence means complete
        json.dump(manifest, f, indent=2)
    engine.close()
    if progress:
        print(f"prep: {counts['records']:,} records ({counts['rejected']:,} rejected), {counts['tokens_out']:,} tokens in "
              f"{elapsed:.1f}s ({timing['tokens_per_s']:,.0f} tokens/s, {timing['records_per_s']:,.0f} records/s, "
              f"engine {cfg.engine})", flush=True)
        dist = counts["dialogue_tokens"]
        print(f"prep: dialogue tokens min {dist['min']:,} p50 {dist['p50']:,} p90 {dist['p90']:,} p99 {dist['p99']:,} "
              f"max {dist['max']:,}; {counts['dialogues_split']:,} of {counts['dialogues']:,} dialogues split "
              f"(seq_len {cfg.seq_len:,}) into {split_windows(counts):,} windows", flush=True)
    return manifest
