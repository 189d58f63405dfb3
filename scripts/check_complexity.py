"""Refuse new functions over the complexity limit; make the list of old offenders shrink.

``ruff check --select C901`` names every function over ``max-complexity``. An offender is allowed only
while it is listed (``path:function``, one a line) in the allowlist given as argument; a listed
function that is no longer an offender must leave the list, so the list can only shrink.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

_NAME_RE = re.compile(r"`([^`]+)` is too complex")


def offenders() -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format", "json", "--exit-zero", "."],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found = set()
    for item in json.loads(out):
        match = _NAME_RE.search(item["message"])
        path = Path(item["filename"]).resolve().relative_to(Path.cwd().resolve())
        found.add(f"{path}:{match.group(1) if match else '?'}")
    return found


def allowed(path: Path) -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def main(argv: list[str]) -> int:
    listed = allowed(Path(argv[1]))
    found = offenders()
    new, gone = sorted(found - listed), sorted(listed - found)
    for name in new:
        print(f"  too complex (max 10), not allowed: {name}")
    for name in gone:
        print(f"  no longer too complex: remove {name} from {argv[1]}")
    if new or gone:
        return 1
    print(f"  {len(found)} listed offender(s) remain")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
