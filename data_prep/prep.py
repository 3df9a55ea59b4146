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
from .tokenize import split_into_windows, utterance_token_ids
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


def _prepare_into(inputs, in_meta, tmp, cfg, tokenizer, ids, fp, progress) -> dict:
    t0 = time.time()
    items, rejected = [], []
    counts = {"records": 0, "dialogues": 0, "rejected": 0, "windows": 0, "split_dialogues": 0,
              "utterances": 0, "tokens_in": 0}
    bar = tqdm(desc="prep: tokenize", unit=" dialogues", disable=not progress, mininterval=2.0)
    for path, meta in zip(inputs, in_meta):
        meta.update(records=0, kept=0, rejected=0)
        kept_here = 0
        for rec in iter_dialogues(path, cfg.format):
            if cfg.max_dialogues is not None and kept_here >= cfg.max_dialogues:
                break
            meta["records"] += 1
            counts["records"] += 1
            try:
                if isinstance(rec, DataError):
                    raise rec
                utts = utterance_token_ids(rec, tokenizer, cfg.speaker_tags)
                windows = split_into_windows(rec, utts, ids, cfg.seq_len)
            except DataError as e:
                if cfg.on_bad_record == "error":
                    raise
                rejected.append({"source": e.source, "line": e.line, "reason": e.reason})
                meta["rejected"] += 1
                counts["rejected"] += 1
                continue
            kept_here += 1
            meta["kept"] += 1
            counts["dialogues"] += 1
            counts["windows"] += len(windows)
            counts["split_dialogues"] += len(windows) > 1
            counts["utterances"] += len(utts)
            counts["tokens_in"] += sum(len(w) for w in windows)
            items.extend(windows)
            bar.update(1)
            if counts["dialogues"] % 200 == 0:
                bar.set_postfix(tokens=counts["tokens_in"], refresh=False)
        if kept_here == 0 and meta["records"] and cfg.on_bad_record == "error":
            raise DataError(path, 1, "no usable dialogue in this file")
    bar.close()
    if not items:
        raise ValueError(f"no dialogues left to pack from {inputs} ({counts['rejected']} rejected)")

    bins = pack_first_fit_decreasing(items, cfg.seq_len)
    rows = [build_row([items[i] for i in b], cfg.seq_len, ids.pad) for b in bins]
    shards = []
    for k in tqdm(range(0, len(rows), cfg.shard_rows), desc="prep: write shards", disable=not progress):
        shards.append(write_shard(rows[k:k + cfg.shard_rows], os.path.join(tmp, f"dialogue-{len(shards):05d}.parquet")))
    if rejected:
        with open(os.path.join(tmp, "rejected.jsonl"), "w") as f:
            for r in rejected:
                f.write(json.dumps(r) + "\n")
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))

    tokens_out = sum(s["tokens"] for s in shards)
    slots = len(rows) * cfg.seq_len
    counts.update(sequences=len(rows), tokens_out=tokens_out, pad_tokens=slots - tokens_out,
                  packing_efficiency=round(tokens_out / slots, 6))
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
        "seconds": round(time.time() - t0, 3),
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:  # written last: its presence means complete
        json.dump(manifest, f, indent=2)
    return manifest
