"""README's Python quick start runs as written (with 4 sampling steps instead of 50 and a profile of 4
images instead of 30, to be quick): a front door whose first example fails is worse than none."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    code = "\n".join(blocks)
    code, n = re.subn(r"\b(steps|num_steps|num_inference_steps)=50\b", r"\1=4", code)
    assert n >= 3, "the examples' step counts are where this test expects them"
    code, n = re.subn(r"class_labels=list\(range\(10\)\) \* 3", "class_labels=list(range(4))", code)
    assert n == 1, "the profile's class labels are where this test expects them"
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    import ditaccel

    assert ditaccel.state_of(namespace["pipe"]) is not None  # the SODA plan is applied at the end
    assert namespace["images"] is not None
