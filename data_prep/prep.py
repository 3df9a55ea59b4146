"""Single-process data preparation: read → validate → tokenize → window → pack → Parquet shards + manifest.

The output folder is written under a temporary name and renamed when complete, so an interrupted or failed
prep never leaves a folder with a manifest. Re-running with the same fingerprint reuses the output.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

from tqdm import tqdm

from .adapters import iter_dialogues
from .config import DataConfig
from .packing import build_row, pack_first_fit_decreasing
from .schema import DataError
from .shards import MANIFEST, sha256_file, write_shard
from .tokenize import split_into_windows
from .tokenizer import load_tokenizer, prepare_tokenizer


def _tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, tokenizer.all_special_tokens]).encode()).hexdigest()


def fingerprint(inputs: list[dict], cfg: DataConfig, tok_digest: str) -> str:
    payload = {"inputs": [(i["sha256"], i["format"]) for i in inputs], "config": cfg.model_dump(mode="json"),
               "tokenizer": tok_digest, "format_version": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _existing_fingerprint(out: str) -> str | None:
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError):
        return None


def prepare(inputs: list[str], out: str, cfg: DataConfig, progress: bool = True) -> dict:
    """Prepare dialogue shards from ``inputs`` into ``out``; return the manifest."""
    for p in inputs:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: input file not found")
    tokenizer = load_tokenizer(cfg.tokenizer)
    ids = prepare_tokenizer(tokenizer, cfg.eou, cfg.eou_token)
    in_meta = [{"path": os.path.abspath(p), "sha256": sha256_file(p), "format": cfg.format} for p in inputs]
    fp = fingerprint(in_meta, cfg, _tokenizer_digest(tokenizer))
    if _existing_fingerprint(out) == fp:
        with open(os.path.join(out, MANIFEST)) as f:
            return json.load(f)
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, MANIFEST)):
        raise FileExistsError(f"{out}: exists, is not empty and is not a convsink shard folder; choose another --out")

    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        manifest = _prepare_into(inputs, in_meta, tmp, cfg, tokenizer, ids, fp, progress)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_records(inputs, in_meta, cfg, rejected, counts, progress):
    """All input records in order; adapter errors are raised or quarantined here."""
    good = []
    with tqdm(desc="prep: read", unit=" records", disable=not progress, mininterval=2.0) as bar:
        for path, meta in zip(inputs, in_meta):
            meta.update(records=0, kept=0, rejected=0)
            for rec in iter_dialogues(path, cfg.format):
                if cfg.max_dialogues is not None and meta["records"] >= cfg.max_dialogues:
                    break
                meta["records"] += 1
                counts["records"] += 1
                bar.update(1)
                if isinstance(rec, DataError):
                    _reject(rec, cfg, rejected, counts, meta)
                    continue
                good.append((rec, meta))
    return good


def _reject(err: DataError, cfg, rejected, counts, meta) -> None:
    if cfg.on_bad_record == "error":
        raise err
    rejected.append({"source": err.source, "line": err.line, "reason": err.reason})
    meta["rejected"] += 1
    counts["rejected"] += 1


def _texts(dialogue, speaker_tags: bool) -> list[str]:
    return [f"{t.speaker}: {t.text}" if speaker_tags and t.speaker else t.text for t in dialogue.turns]


def _tokenize(good, cfg, tokenizer, tokenizer_dir, progress) -> list[list[list[int]]]:
    texts = [_texts(d, cfg.speaker_tags) for d, _ in good]
    if cfg.engine == "ray":
        from .ray_engine import tokenize_blocks

        blocks = [texts[i:i + cfg.block_dialogues] for i in range(0, len(texts), cfg.block_dialogues)]
        return [d for block in tokenize_blocks(blocks, tokenizer_dir, cfg.workers) for d in block]
    out = []
    for t in tqdm(texts, desc="prep: tokenize", unit=" dialogues", disable=not progress, mininterval=2.0):
        out.append(tokenizer(t, add_special_tokens=False)["input_ids"])
    return out


def _prepare_into(inputs, in_meta, tmp, cfg, tokenizer, ids, fp, progress) -> dict:
    from .memory_tasks import build_lmr, build_smr

    t0 = time.time()
    rejected: list[dict] = []
    counts = {"records": 0, "dialogues": 0, "rejected": 0, "windows": 0, "split_dialogues": 0,
              "utterances": 0, "tokens_in": 0}
    good = _read_records(inputs, in_meta, cfg, rejected, counts, progress)
    tokenizer_dir = os.path.join(tmp, "tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    t_tok = time.time()
    tokenized = _tokenize(good, cfg, tokenizer, tokenizer_dir, progress)
    t_tok = time.time() - t_tok

    items, kept_utts = [], []
    for (dialogue, meta), utts in zip(good, tokenized):
        try:
            windows = split_into_windows(dialogue, utts, ids, cfg.seq_len)
            for w in windows:  # ids repeat across files (MSC episodes recur in later-session files): name the file
                w.dialogue_id = f"{os.path.basename(dialogue.source)}:{dialogue.id}"
        except DataError as e:
            _reject(e, cfg, rejected, counts, meta)
            continue
        meta["kept"] += 1
        counts["dialogues"] += 1
        counts["windows"] += len(windows)
        counts["split_dialogues"] += len(windows) > 1
        counts["utterances"] += len(utts)
        counts["tokens_in"] += sum(len(w) for w in windows)
        items.extend(windows)
        kept_utts.append(utts)
    for path, meta in zip(inputs, in_meta):
        if meta["records"] and meta["kept"] == 0 and cfg.on_bad_record == "error":
            raise DataError(path, 1, "no usable dialogue in this file")
    if not items:
        raise ValueError(f"no dialogues left to pack from {inputs} ({counts['rejected']} rejected)")

    smr, smr_stats = build_smr([u for d in kept_utts for u in d], cfg.smr, ids, cfg.seq_len, cfg.seed)
    lmr, lmr_stats = build_lmr(kept_utts, cfg.lmr, ids, cfg.seq_len, cfg.seed)
    counts.update(smr_stats, **lmr_stats)

    shards, n_rows, tokens_by_kind = [], 0, {}
    for kind, kind_items in (("dialogue", items), ("smr", smr), ("lmr", lmr)):
        if not kind_items:
            continue
        bins = pack_first_fit_decreasing(kind_items, cfg.seq_len)
        rows = [build_row([kind_items[i] for i in b], cfg.seq_len, ids.pad) for b in bins]
        n_rows += len(rows)
        for k in range(0, len(rows), cfg.shard_rows):
            name = f"{kind}-{k // cfg.shard_rows:05d}.parquet"
            shards.append(write_shard(rows[k:k + cfg.shard_rows], os.path.join(tmp, name)))
        tokens_by_kind[kind] = sum(len(it) for it in kind_items)
    if rejected:
        with open(os.path.join(tmp, "rejected.jsonl"), "w") as f:
            for r in rejected:
                f.write(json.dumps(r) + "\n")

    dialogue_shards = [s for s in shards if s["mask_kind"] == ["dialogue"]]
    tokens_out = sum(s["tokens"] for s in dialogue_shards)
    slots = sum(s["rows"] for s in dialogue_shards) * cfg.seq_len
    counts.update(sequences=sum(s["rows"] for s in dialogue_shards), tokens_out=tokens_out, pad_tokens=slots - tokens_out,
                  packing_efficiency=round(tokens_out / slots, 6), rows_all_kinds=n_rows, tokens_by_kind=tokens_by_kind)
    elapsed = time.time() - t0
    manifest = {
        "format_version": 1,
        "fingerprint": fp,
        "inputs": in_meta,
        "config": cfg.model_dump(mode="json"),
        "tokenizer": {"spec": cfg.tokenizer, "bos_id": ids.bos, "eou_id": ids.eou, "pad_id": ids.pad,
                      "vocab_size": len(tokenizer)},
        "seq_len": cfg.seq_len,
        "counts": counts,
        "shards": shards,
        "timing": {"seconds": round(elapsed, 3), "tokenize_seconds": round(t_tok, 3), "engine": cfg.engine},
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:  # written last: its presence means complete
        json.dump(manifest, f, indent=2)
    if progress:
        print(f"prep: {counts['tokens_in']} tokens in {elapsed:.1f}s ({counts['tokens_in'] / max(elapsed, 1e-9):,.0f} tokens/s, "
              f"{counts['records'] / max(elapsed, 1e-9):,.0f} records/s)", flush=True)
    return manifest
