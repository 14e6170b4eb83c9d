"""The README's Python examples run as written (in order, in one namespace).

A block whose first line is ``# excerpt`` shows part of a file that other tests run (e.g.
``examples/two_stage_detector.py``) and is skipped here.
"""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs: first in the queue (tests/conftest.py)

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    return [b for b in blocks if not b.lstrip().startswith("# excerpt")]


def test_readme_python_blocks_run(fast_compile, capsys):
    blocks = _blocks()
    assert len(blocks) >= 2, "the API tour's examples went missing"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block that failed
            raise AssertionError(f"README python block {i + 1} failed: {e!r}\n{block}") from e
    out = capsys.readouterr().out
    assert "[-84. -40.  99.  55.]" in out  # the printed py-faster-rcnn anchor, as the README says
