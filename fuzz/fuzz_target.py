"""Run one fuzz target under atheris (libFuzzer): ``python fuzz/fuzz_target.py NAME [libFuzzer options]
[CORPUS_DIR...]``. The agent's modules are instrumented for coverage; a crash (an exception that is
not the project's typed error) makes libFuzzer print the traceback, write the input as
``<artifact_prefix>crash-<sha1>`` and exit non-zero. `fuzz/run` is the usual way in."""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]  # atheris ships no type information

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: `agent` and `fuzz`

with atheris.instrument_imports(include=["agent"]):
    from fuzz.targets import TARGETS, run_one


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus dirs]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], lambda data: run_one(target, data))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
