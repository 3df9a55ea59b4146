"""Bad input on the Ray engine gives exactly the local engine's output and errors: every fuzz case (``fuzz_cases``)
in skip mode, byte for byte, with chunks small enough that records and duplicates straddle tasks; error mode, one
line per kind of case. All in one Ray session (``ray.init`` costs seconds)."""

from __future__ import annotations

import pytest

from data_prep.config import DataConfig
from data_prep.prep import prepare
from data_prep.schema import DataError
from tests.data_prep import fuzz_cases
from tests.data_prep.test_bad_input import check_skip_run, check_special_tokens_are_text

pytestmark = pytest.mark.slow

RAY = dict(engine="ray", workers=2, chunk_records=2)  # small chunks: a duplicate's first line is in another task
RAY_ERROR_CASES = [c for c in fuzz_cases.one_per_kind(fuzz_cases.record_cases())
                   if c.code != "wrong_type" or c.name.startswith(("msc-previous_dialogs-", "msc-metadata-",
                                                                    "canonical-turns[1]-", 'personachat-"p1"[1]-'))]


@pytest.fixture(scope="module")
def ray_session():
    from data_prep.ray_cluster import ensure_ray

    ray = ensure_ray(num_cpus=2, worker_logs=False, temp_tag="csf")
    yield ray
    ray.shutdown()


def test_skip_mode_output_is_byte_identical_to_local(ray_session, tmp_path, tokenizer):
    cases = fuzz_cases.record_cases() + [fuzz_cases.huge_line_case(50)]
    (tmp_path / "in").mkdir()
    paths = {c.name: fuzz_cases.write(c, tmp_path / "in") for c in cases}
    outs = {}
    for name, extra in (("local", dict(engine="local")), ("ray", RAY)):
        outs[name] = tmp_path / name
        prepare(list(paths.values()), str(outs[name]), DataConfig(seq_len=64, on_bad_record="skip", **extra),
                progress=False)
    m = check_skip_run(outs["ray"], paths, cases)
    check_special_tokens_are_text(outs["ray"], m, tokenizer)
    files = sorted(p.name for p in outs["local"].iterdir() if p.is_file() and p.name != "run.json")
    assert "rejected.jsonl" in files and "manifest.json" in files
    assert files == sorted(p.name for p in outs["ray"].iterdir() if p.is_file() and p.name != "run.json")
    for name in files:
        assert (outs["ray"] / name).read_bytes() == (outs["local"] / name).read_bytes(), name


def _error(src: str, out, cfg: DataConfig) -> DataError:
    with pytest.raises(DataError) as e:
        prepare([src], str(out), cfg, progress=False)
    assert not out.exists()
    return e.value


@pytest.mark.parametrize("case", [c for c in RAY_ERROR_CASES + fuzz_cases.file_cases() if c.line is not None],
                         ids=lambda c: c.name)
def test_error_mode_gives_the_local_error(ray_session, tmp_path, case):
    src = fuzz_cases.write(case, tmp_path)
    local = _error(src, tmp_path / "local", DataConfig(seq_len=64, engine="local", format=case.fmt))
    ray = _error(src, tmp_path / "ray", DataConfig(seq_len=64, format=case.fmt, **RAY))
    assert str(ray) == str(local) and ray.code == local.code == case.code
    assert str(ray).startswith(f"{src}:{case.line}: ")
