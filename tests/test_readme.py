"""README's Python snippets run as written (issue 15, "Why" 10): each one
marked `<!-- README snippet: NAME ... -->` runs in a fresh interpreter."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARKED = re.compile(r"<!-- README snippet: (\S+) .*?-->\n```python\n(.*?)```", re.S)
SNIPPETS = dict(MARKED.findall(README.read_text(encoding="utf-8")))


def run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_every_python_snippet_that_is_not_a_signature_is_marked_to_run():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    unmarked = [b for b in blocks if b not in SNIPPETS.values()]
    # The rest are call signatures and one-line import switches.
    for block in unmarked:
        first = block.splitlines()[0]
        assert re.match(r"^\w+\(", first) or first.startswith("from necrocode."), block


@pytest.mark.parametrize("name", sorted(set(SNIPPETS) - {"local-wiring"}))
def test_a_readme_snippet_runs(name, tmp_path):
    code = SNIPPETS[name].replace("start_http_server(9100)", "start_http_server(0)")
    result = run(code, tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(os.name != "posix", reason="the local runner needs POSIX")
def test_the_local_wiring_snippet_runs_and_prints_what_it_says(tmp_path):
    code = SNIPPETS["local-wiring"]
    result = run(code, tmp_path)
    assert result.returncode == 0, result.stderr
    expected = re.search(r"^# (\{.*\})$", code, re.M).group(1)
    assert result.stdout.strip() == expected
