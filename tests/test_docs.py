"""The worked plugin in docs/adding_a_method.md is real: its code registers a method that trains and evaluates."""

import os
import re
import sys

from conftest import REPO, tiny_overrides

sys.path.insert(0, os.path.join(REPO, "tools"))
import train_net  # noqa: E402


def test_the_documented_minimal_plugin_trains(tmp_path):
    with open(os.path.join(REPO, "docs", "adding_a_method.md")) as f:
        (code,) = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(code.strip().splitlines()) < 60
    exec(compile(code, "docs/adding_a_method.md", "exec"), {})
    out = str(tmp_path / "entropy")
    config = os.path.join(REPO, "configs", "synthetic", "source_only.yaml")
    overrides = tiny_overrides(out, **{"MODEL.META_ARCHITECTURE": "EntropyMinimization", "VIS_PERIOD": 1})
    assert train_net.cli(["--config-file", config] + overrides) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        text = f.read()
    assert '"loss_entropy"' in text and '"target_entropy"' in text and '"sem_seg/mIoU"' in text
