"""The layout a newcomer reads: every package and module in the README's module map, small modules, the contract's
names spelled out only in the contract modules, no block of code repeated between modules."""

from __future__ import annotations

import ast
import hashlib
import os
import re

from tests.repo import REPO

PACKAGES = ("data_prep", "pipeline", "ray_jobs")
CONTRACT_MODULES = {os.path.join("data_prep", "contract.py"), os.path.join("pipeline", "contract.py")}
MAX_LINES = 400


def _modules() -> list[str]:
    """Every .py file of the library packages, relative to the repository."""
    out = []
    for top in PACKAGES:
        for root, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            out += [os.path.relpath(os.path.join(root, f), REPO) for f in files if f.endswith(".py")]
    return sorted(out)


def _module_map() -> dict[str, str]:
    """README's module map: package folder (``pipeline/attention/``) -> its line."""
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    lines = {}
    for line in section.splitlines():
        m = re.match(r"^    ([a-z_]+(?:/[a-z_]+)*/)\s+(.*)$", line)
        if m:
            lines[m.group(1)] = m.group(2)
    return lines


def test_every_package_and_module_is_in_the_readme_module_map():
    listed = _module_map()
    packages = {os.path.dirname(m) + "/" for m in _modules() if m.endswith("__init__.py")}
    missing = sorted(p for p in packages if p not in listed)
    assert not missing, f"packages missing from the README's module map: {missing}"
    unnamed = []
    for m in _modules():
        name = os.path.basename(m)[:-3]
        if name == "__init__":
            continue
        if not re.search(rf"(^|[\s·(]){name}\b", listed[os.path.dirname(m) + "/"]):
            unnamed.append(m)
    assert not unnamed, f"modules not named on their package's line of the README's module map: {unnamed}"


def test_the_module_map_names_no_package_that_is_gone():
    packages = {os.path.dirname(m) + "/" for m in _modules() if m.endswith("__init__.py")}
    stale = [p for p in _module_map() if p.split("/")[0] in PACKAGES and p not in packages]
    assert not stale, f"the README's module map lists packages that do not exist: {stale}"


def test_no_module_is_over_400_lines():
    long = {m: n for m in _modules() if (n := len(open(os.path.join(REPO, m)).read().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _contract_names() -> set[str]:
    from pipeline import contract

    return (set(contract.TASKS) | set(contract.TENSOR_COLUMNS) | {contract.MASK_KIND, contract.DIALOGUE_IDS,
            contract.TARGETS} | set(contract.CACHE_POLICIES))


def _string_literals(path: str):
    """(line, value) of every plain string constant of a module that is not a docstring."""
    tree = ast.parse(open(path).read())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add(id(first.value))
    joined = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}  # f-string pieces
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                and id(node) not in joined):
            yield node.lineno, node.value


def test_contract_names_are_spelled_out_only_in_the_contract_modules():
    names = _contract_names()
    found = [f"{m}:{line}: {value!r}" for m in _modules() if m not in CONTRACT_MODULES and m.split(os.sep)[0] != "ray_jobs"
             for line, value in _string_literals(os.path.join(REPO, m)) if value in names]
    assert not found, "task / column / cache-policy names spelled out outside the contract modules " \
                      "(import them from pipeline.contract or data_prep.contract):\n" + "\n".join(found)


def test_the_literal_check_sees_a_spelled_out_name(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""doc: dialogue"""\nx = {"input_ids": 1}\ny = f"loss/{x}"\nz = "recompute"\n')
    assert sorted(v for _, v in _string_literals(str(path)) if v in _contract_names()) == ["input_ids", "recompute"]


def _code_lines(path: str) -> list[tuple[int, str]]:
    """(line number, whitespace-folded text) of the lines that carry code: no blank, comment, import or lone
    punctuation lines, no docstring lines."""
    src = open(path).read()
    skip = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            skip.update(range(node.lineno, node.end_lineno + 1))
    out = []
    for i, line in enumerate(src.splitlines(), start=1):
        text = " ".join(line.split())
        if (i in skip or not text or text.startswith(("#", "import ", "from ")) or re.fullmatch(r"[()\[\]{},:]+", text)):
            continue
        out.append((i, text))
    return out


def _repeated_blocks(paths: list[str], size: int = 6) -> list[str]:
    seen: dict[str, tuple[str, int]] = {}
    repeats = []
    for m in paths:
        lines = _code_lines(os.path.join(REPO, m))
        for k in range(len(lines) - size + 1):
            window = lines[k:k + size]
            digest = hashlib.sha1("\n".join(t for _, t in window).encode()).hexdigest()
            if digest in seen and seen[digest][0] != m:
                repeats.append(f"{m}:{window[0][0]} repeats {seen[digest][0]}:{seen[digest][1]}")
            seen.setdefault(digest, (m, window[0][0]))
    return repeats


def test_no_block_of_six_lines_is_repeated_between_modules():
    repeats = _repeated_blocks([m for m in _modules() if m.split(os.sep)[0] in ("pipeline", "data_prep")])
    assert not repeats, "blocks of 6+ code lines repeated between modules:\n" + "\n".join(repeats)


def test_the_repeat_check_finds_a_copied_block(tmp_path, monkeypatch):
    body = "".join(f"x{i} = compute({i}, 'a')\n" for i in range(6))
    (tmp_path / "a.py").write_text(body)
    (tmp_path / "b.py").write_text("y = 1\n" + body)
    monkeypatch.setattr("tests.test_layout.REPO", str(tmp_path))
    assert _repeated_blocks(["a.py", "b.py"]) == ["b.py:2 repeats a.py:1"]


def _guarantee_refs() -> list[tuple[str, str | None]]:
    """(test file, test name or None) of every reference in README's "What convsink guarantees" table."""
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## What convsink guarantees", 1)[1].split("\n## ", 1)[0]
    refs = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| promise"):
            continue
        path = None
        for ref in re.findall(r"`([^`]+)`", line.rsplit(" | ", 1)[-1]):
            if ref.startswith("tests/"):
                path, _, name = ref.partition("::")
            elif ref.startswith("::") and path:
                name = ref[2:]
            else:
                continue
            refs.append((path, name or None))
    return refs


def test_every_guarantee_names_a_test_that_exists():
    refs = _guarantee_refs()
    assert len(refs) >= 20, refs
    missing = [f"{p}::{n}" if n else p for p, n in refs
               if not os.path.isfile(os.path.join(REPO, p))
               or (n and not re.search(rf"^def {n}\(", open(os.path.join(REPO, p)).read(), re.M))]
    assert not missing, "README's guarantees table names tests that do not exist:\n" + "\n".join(missing)
