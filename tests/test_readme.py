"""The README's examples run as they are written, one after the other, as a reader would paste them."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    trainer = namespace["trainer"]
    assert trainer.state.epoch == 2 and trainer.state.iteration == 2 * len(namespace["StreamBatches"](
        namespace["documents"], batch_size=16, seq_len=100))
    assert trainer.state.output == trainer.state.output  # a finite mean over the masked and unmasked chunks
