"""The fuzz targets of fuzz/ (issue 12): the seed corpus replayed in-process (fast, every run), and
each target fuzzed by atheris in a subprocess for a bounded time (FUZZ_SECONDS, default 20 s each;
0 skips). A crash is an exception that is not the project's typed error; the crashing input is kept
in fuzz/crashes/ and belongs in fuzz/corpus/<target>/ with its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fuzz.targets import TARGETS, run_one

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
DICTS = ROOT / "fuzz" / "dicts"
FUZZ_SECONDS = int(os.environ.get("FUZZ_SECONDS", "20"))


def _seeds(target: str) -> list[Path]:
    return sorted(p for p in (CORPUS / target).iterdir() if p.is_file())


def test_every_target_has_a_small_seed_corpus():
    assert set(TARGETS) == {p.name for p in CORPUS.iterdir() if p.is_dir()}
    for target in TARGETS:
        seeds = _seeds(target)
        assert seeds, target
        assert all(p.stat().st_size <= 64 * 1024 for p in seeds)  # kept in git: small files only


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seed_corpus_replays_without_a_crash(target):
    for seed in _seeds(target):
        run_one(TARGETS[target], seed.read_bytes())  # raises on a crash, naming nothing: see the traceback


#: fuzzers run side by side, one per core (each is one process on one core): the same fuzzing time
#: per target in half the wall time on two cores
FUZZ_PARALLEL = max(1, min(len(TARGETS), os.cpu_count() or 1))


def _fuzz(target: str, work: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Fuzz `target` for FUZZ_SECONDS; (the finished atheris run, its artifact directory)."""
    scratch = work / "corpus"
    scratch.mkdir()
    cmd = [
        sys.executable,
        str(ROOT / "fuzz" / "fuzz_target.py"),
        target,
        f"-max_total_time={FUZZ_SECONDS}",
        "-timeout=10",  # one input slower than 10 s is a crash (a hang)
        "-rss_limit_mb=2048",
        "-max_len=65536",
        "-print_final_stats=1",
        f"-artifact_prefix={work}/",
        *([f"-dict={DICTS / (target + '.dict')}"] if (DICTS / (target + ".dict")).exists() else []),
        str(scratch),  # new inputs go here: the seed corpus in the repo is only read
        str(CORPUS / target),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=FUZZ_SECONDS * 3 + 30)
    return done, work


@pytest.fixture(scope="module")
def fuzz_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[tuple[Any, Path]]]]:
    """The fuzzing run of every target selected (-k), all started when the first fuzz test asks,
    FUZZ_PARALLEL at a time; the runs not started yet are cancelled if the tests stop early."""
    wanted = sorted(
        item.callspec.params["target"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_fuzz_target_finds_no_crash"
    )
    pool = ThreadPoolExecutor(FUZZ_PARALLEL)
    try:
        yield {t: pool.submit(_fuzz, t, tmp_path_factory.mktemp(f"fuzz-{t}")) for t in wanted}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.timeout(FUZZ_SECONDS * 9 + 120)  # its own run, after at most two rounds of the others
@pytest.mark.skipif(FUZZ_SECONDS <= 0, reason="FUZZ_SECONDS=0")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target_finds_no_crash(target, fuzz_runs):
    done, work = fuzz_runs[target].result()
    crashes = sorted(p.name for p in work.iterdir() if p.is_file())
    assert done.returncode == 0 and not crashes, f"{target} crashed ({crashes}):\n{done.stderr[-6000:]}"
    runs = next((line for line in done.stderr.splitlines() if "number_of_executed_units" in line), "")
    assert int(runs.rsplit(":", 1)[-1]) > 100, f"{target} barely ran: {runs!r}"
