"""The real seed datasets through the local Hub mirror (skipped where ../shared/hub is absent)."""

import json

import pytest

from multitune.config import config_from_dict
from multitune.data.load import load_tasks

pytestmark = pytest.mark.mirror


def test_seed_datasets_load_and_split_80_20(mirror, assets):
    cfg = config_from_dict({
        "hub_mirror": str(mirror),
        "model": {"name_or_path": str(assets["model"])},
        "tasks": [{"name": "claims"}, {"name": "banking77"}, {"name": "commonsense_qa"}],
    })
    data = {td.task.name: td for td in load_tasks(cfg, None, create=True)}
    b = data["banking77"]
    assert len(b.task.label_names) == 77 and b.task.label_names[11] == "card_arrival"
    assert {ex.label for ex in b.val} == set(range(77))  # stratified: every intent is validated
    total = len(b.train) + len(b.val)
    assert abs(len(b.val) / total - 0.2) < 0.01 and total > 9900
    c = data["claims"]
    assert c.task.label_names == ["Claim", "Not a Claim"] and c.task.text_col == "text"
    q = data["commonsense_qa"]
    assert q.task.label_names == list("ABCDE") and q.val[0].target in "ABCDE"
    json.dumps(b.split)  # the recorded split is plain JSON
