"""The importer driver: batches keep link groups together, so linking can run on the workers."""

from __future__ import annotations

import pytest

from dsat_core.data.importers.base import ImportRecord, _batches


def _records(groups: str) -> list[ImportRecord]:
    return [ImportRecord(f"{g}{k}", {}, {"group": g}) for k, g in enumerate(groups)]


def test_batches_end_only_where_the_group_changes():
    records = _records("aaabbbbbc")
    batches = list(_batches(records, 2, lambda r: r.fields["group"]))
    assert ["".join(r.fields["group"] for r in b) for b in batches] == ["aaa", "bbbbb", "c"]
    assert [r.key for b in batches for r in b] == [r.key for r in records]
    plain = list(_batches(records, 2))
    assert [len(b) for b in plain] == [2, 2, 2, 2, 1]


def test_a_group_listed_in_two_places_is_an_error():
    with pytest.raises(ValueError, match="group 'a' listed in two places"):
        list(_batches(_records("aabba"), 2, lambda r: r.fields["group"]))
