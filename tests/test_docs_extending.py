"""docs/extending.md's worked example runs as written and prints what its comments say.

The first ```python block of the page is executed; every `print(...)  # expected` line's output must equal
the comment. It registers `mylib::my_relu` (a torch.library custom op, so defined once per process).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

from neural_mechanics.symmetry.ops import rule_for

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def test_worked_example_prints_what_the_page_says():
    text = DOC.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    expected = [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+# (.*)$", code, re.M)]
    assert len(expected) == 4
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_extending"})
    assert out.getvalue().splitlines() == expected
    assert rule_for(torch.ops.mylib.my_relu.default) is None  # the example's registration was undone
