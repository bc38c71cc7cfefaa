"""The tokenised-data cache: a hit gives exactly what a fresh build gives; any changed input misses."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from multitune.config import config_from_dict
from multitune.data.formatting import Formatter
from multitune.data.prepared import prepare
from tests.conftest import tiny_config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _cfg(assets, tmp_path, **over):
    raw = tiny_config(assets, tmp_path / "run")
    raw["model"].update(over.pop("model", {}))
    raw["data"] = over.pop("data", {})
    return config_from_dict(raw)


def _snapshot(p):
    return ([list(r.values()) for r in p.train], {k: list(v["input_ids"]) for k, v in p.eval.items()},
            [(td.train, td.val, td.split) for td in p.data])


def test_second_prepare_is_a_hit_equal_to_a_fresh_build(assets, tokenizer, tmp_path, cache):
    cfg = _cfg(assets, tmp_path)
    f = Formatter(tokenizer, cfg.model.max_length)
    first, second = prepare(cfg, f, None), prepare(cfg, f, None)
    assert not first.cached and second.cached
    assert _snapshot(first) == _snapshot(second)
    assert [td.task.label_names for td in second.data] == [td.task.label_names for td in first.data]
    uncached = prepare(_cfg(assets, tmp_path, data={"cache": False}), f, None)
    assert not uncached.cached and _snapshot(uncached) == _snapshot(first)


def test_any_changed_input_misses(assets, tokenizer, tmp_path, cache):
    cfg = _cfg(assets, tmp_path)
    prepare(cfg, Formatter(tokenizer, cfg.model.max_length), None)
    shorter = _cfg(assets, tmp_path, model={"max_length": 185})
    assert not prepare(shorter, Formatter(tokenizer, 185), None).cached
    other_split = _cfg(assets, tmp_path, data={"split_seed": 7})
    assert not prepare(other_split, Formatter(tokenizer, cfg.model.max_length), None).cached
    # the data itself changes: a copy of the claims file with one row fewer
    data_dir = tmp_path / "claims-copy"
    shutil.copytree(assets["claims"], data_dir)
    raw = tiny_config(assets, tmp_path / "run")
    raw["tasks"][0]["dataset"] = str(data_dir)
    cfg = config_from_dict(raw)
    f = Formatter(tokenizer, cfg.model.max_length)
    assert not prepare(cfg, f, None).cached and prepare(cfg, f, None).cached
    before = prepare(cfg, f, None).data[0].split["n_rows"]
    file = next(data_dir.rglob("*.parquet"))
    table = pq.read_table(file)
    pq.write_table(table.slice(0, table.num_rows - 1), file)
    changed = prepare(cfg, f, None)
    assert not changed.cached and changed.data[0].split["n_rows"] == before - 1


def test_rows_cut_to_fit_are_counted_per_task_and_printed(assets, tokenizer, tmp_path, cache):
    from multitune.data.load import training_summary

    cfg = _cfg(assets, tmp_path, model={"max_length": 185})
    f = Formatter(tokenizer, 185)
    fresh, cached = prepare(cfg, f, None), prepare(cfg, f, None)
    assert cached.cached
    whole = Formatter(tokenizer, 10_000)
    expected = {td.task.name: sum(len(ids) > 185 for ids in whole.encode(td.train)["input_ids"]) for td in fresh.data}
    assert expected["banking77"] > 0  # its prompt lists the 12 labels
    for p in (fresh, cached):
        assert {td.task.name: td.truncated for td in p.data} == expected
        assert max(len(ids) for ids in p.train["input_ids"]) <= 185
    line = training_summary(cached.data, len(cached.train), f, cached=True)
    n = len(cached.data[1].train)
    assert f"banking77={n} ({expected['banking77']} cut to fit)" in line and "max_length=185" in line


class _Planted:
    """A pickle that, when loaded, writes a file: what a stranger with write access to a shared cache could plant."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_a_cache_entry_is_never_unpickled(assets, tokenizer, tmp_path, cache):
    """$MULTITUNE_CACHE often sits on a pod's shared volume: a pickle planted in an entry must run nothing."""
    import pickle

    cfg = _cfg(assets, tmp_path)
    f = Formatter(tokenizer, cfg.model.max_length)
    first = prepare(cfg, f, None)
    [entry] = [p for p in cache.glob("prepared/*") if (p / "DONE").exists()]
    sentinel = tmp_path / "ran-code"
    for name in ("tasks.pkl", *(p.name for p in entry.iterdir() if p.is_file() and p.name != "DONE")):
        (entry / name).write_bytes(pickle.dumps(_Planted(sentinel)))
    again = prepare(cfg, f, None)
    assert not sentinel.exists()
    assert _snapshot(again) == _snapshot(first)  # the damaged entry was rebuilt, not trusted
