"""The suite runs as ``.venv/bin/python -m pytest`` on a fresh machine, where the venv's scripts
are not on the PATH: a test that starts a program by its bare name passes only on a machine
where an earlier install left it there. Programs are started through ``sys.executable`` or by
absolute path (``/usr/bin/storescu``)."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
# a subprocess call whose argument list opens with a string literal that is not a path
BARE_PROGRAM = re.compile(r"""subprocess\.(?:run|Popen|call|check_call|check_output)\(\s*[\[(]\s*["']([^"'/\s]+)["']""")


def test_no_test_starts_a_program_by_its_bare_name():
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for match in BARE_PROGRAM.finditer(path.read_text()):
            line = path.read_text()[: match.start()].count("\n") + 1
            offenders.append(f"{path.relative_to(TESTS)}:{line}: {match.group(1)!r}")
    assert not offenders, "programs started by bare name (use sys.executable or /usr/bin/...): " + ", ".join(offenders)
