"""Input files: local paths or URIs that pyarrow reads (``file://``, ``s3://``, ``gs://``, ``hdfs://``, ...).

``resolve_inputs`` expands globs (sorted per pattern, in the order given); ``scan`` reads a file once on the
driver for its sha256 and the byte ranges of record chunks (with their first line numbers), so workers can read
and parse the chunks in parallel and still report ``FILE:LINE``.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
from dataclasses import dataclass, field

from data_prep.lines import skip_bom

_GLOB = set("*?[")


def is_uri(path: str) -> bool:
    return "://" in path


HUB_PREFIX = "hf://"  # a Hugging Face Hub dataset id, read from the local cache (``hf_datasets``)
SAVED_DATASET_FILES = ("state.json", "dataset_info.json", "dataset_dict.json")  # what ``save_to_disk`` writes


def dataset_base(spec: str) -> str:
    """``spec`` without its dataset selector (``hf://ID?split=test&name=CONFIG``, a save_to_disk folder``?split=...``;
    ``hf_datasets.selector_of``); any other path unchanged (a ``?`` in a file name stays)."""
    base, sep, _ = spec.partition("?")
    return base if sep and (spec.startswith(HUB_PREFIX) or is_saved_dataset(base)) else spec


def is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in SAVED_DATASET_FILES)


def filesystem(path: str):
    """(pyarrow FileSystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _exists(path: str) -> bool:
    import pyarrow.fs as pafs

    if not is_uri(path):
        return os.path.isfile(path)
    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def _glob_uri(pattern: str) -> list[str]:
    import pyarrow.fs as pafs

    scheme, rest = pattern.split("://", 1)
    base = rest[:min(rest.find(c) for c in _GLOB if c in rest)].rsplit("/", 1)[0]
    fs, base_in_fs = pafs.FileSystem.from_uri(f"{scheme}://{base}")
    prefix = pattern[:len(pattern) - len(rest)] + base
    infos = fs.get_file_info(pafs.FileSelector(base_in_fs, recursive=True))
    found = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        uri = prefix + info.path[len(base_in_fs):]
        if fnmatch.fnmatchcase(uri, pattern):
            found.append(uri)
    return sorted(found)


def resolve_inputs(specs: list[str]) -> list[str]:
    """Files named by ``specs`` (paths, URIs or glob patterns), in order; each pattern's matches sorted.
    A missing file or a pattern that matches nothing is a FileNotFoundError naming it."""
    out: list[str] = []
    for spec in specs:
        if spec.startswith(HUB_PREFIX) or is_saved_dataset(dataset_base(spec)):  # datasets: checked when loaded
            out.append(spec)
        elif any(c in spec for c in _GLOB):
            matches = _glob_uri(spec) if is_uri(spec) else sorted(p for p in glob.glob(spec) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"{spec}: no input file matches this pattern")
            out += matches
        elif not _exists(spec):
            raise FileNotFoundError(f"{spec}: input file not found")
        else:
            out.append(spec)
    seen, unique = set(), []
    for p in out:  # a file named twice (e.g. by two patterns) is read once
        key = p if is_uri(p) else os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def canonical_path(path: str) -> str:
    return path if is_uri(path) else os.path.abspath(path)


def read_bytes(path: str, start: int = 0, end: int | None = None) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_file(p) as f:
        if end is None:
            end = f.size()
        return f.read_at(end - start, start) if end > start else b""


def _iter_blocks(path: str, block: int = 1 << 22):
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        while True:
            data = f.read(block)
            if not data:
                return
            yield data


@dataclass
class Chunk:
    """Records ``[first_record, first_record + records)`` of a JSON-lines file: bytes ``[start, end)``
    beginning at line ``first_line``."""

    start: int
    end: int
    first_line: int
    first_record: int
    records: int


@dataclass
class Scan:
    sha256: str
    size: int
    first_line: str  # the first non-blank line (format detection)
    records: int = 0  # non-blank lines up to max_records (JSON-lines formats)
    chunks: list[Chunk] = field(default_factory=list)


def scan(path: str, chunk_records: int, max_records: int | None = None, lines: bool = True) -> Scan:
    """One pass over the file: sha256, size, first non-blank line, and (``lines``) chunks of ``chunk_records``
    non-blank lines up to ``max_records``. Blank = ASCII whitespace only, a BOM at the file's start skipped (the
    rules of ``lines.json_lines``); a line longer than a block is gathered in parts, so time stays linear."""
    h = hashlib.sha256()
    size, lineno, pos = 0, 0, 0
    first = None
    records = 0
    chunks: list[Chunk] = []
    cur: Chunk | None = None
    parts: list[bytes] = []  # the current line's bytes from earlier blocks
    capped = False

    def line_done(raw: bytes, start: int, end: int) -> None:
        nonlocal lineno, first, records, cur, capped
        lineno += 1
        content, _ = skip_bom(raw, start)
        if not content.strip():
            return
        if first is None:
            first = content.decode("utf-8", errors="replace").strip()
        if not lines or capped:
            return
        if max_records is not None and records >= max_records:
            capped = True
            return
        if cur is None or cur.records >= chunk_records:
            cur = Chunk(start, end, lineno, records, 0)
            chunks.append(cur)
        cur.end = end
        cur.records += 1
        records += 1

    line_start = 0
    for block in _iter_blocks(path):
        h.update(block)
        size += len(block)
        if not lines and first is not None:  # whole-file formats: only the hash and the first line are needed
            pos += len(block)
            continue
        i = 0
        while True:
            j = block.find(b"\n", i)
            if j < 0:
                break
            raw = b"".join(parts + [block[i:j]]) if parts else block[i:j]
            parts = []
            line_done(raw, line_start, pos + j + 1)
            line_start = pos + j + 1
            i = j + 1
        if i < len(block):
            parts.append(block[i:])
        pos += len(block)
    if parts and (lines or first is None):
        line_done(b"".join(parts), line_start, pos)
    return Scan(h.hexdigest(), size, first or "", records, chunks)


def display_name(path: str) -> str:
    return os.path.basename(path.rstrip("/"))
