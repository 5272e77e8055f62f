"""Registry on a real MLflow SQLite store: idempotent registration, compare-and-set champion."""

from __future__ import annotations

import pytest

from pipeline import registry


@pytest.fixture
def run_id(pipeline_home):
    return registry.get_or_create_run("dag__run1", {"airflow.dag_id": "dag"})


def test_run_is_found_again_by_run_key(run_id):
    assert registry.get_or_create_run("dag__run1") == run_id
    assert registry.get_or_create_run("dag__run2") != run_id


def test_register_is_idempotent_per_run_key(run_id):
    v1 = registry.register_version(run_id, "dag__run1", "file:///ck/a", {"x": 1}, "d")
    v2 = registry.register_version(run_id, "dag__run1", "file:///ck/a", {"x": 1}, "d")
    assert v1 == v2 == "1"


def test_promote_compare_and_set(run_id):
    v1 = registry.register_version(run_id, "dag__run1", "file:///ck/a", {}, "")
    other = registry.get_or_create_run("dag__run2")
    v2 = registry.register_version(other, "dag__run2", "file:///ck/b", {}, "")
    assert registry.promote_champion(v1, expected_champion=None) is None
    assert registry.alias_version(registry.CHAMPION).version == 1
    # a decision that saw no champion must not move it now that v1 serves
    with pytest.raises(registry.RegistryConflict, match="champion is v1"):
        registry.promote_champion(v2, expected_champion=None)
    assert registry.alias_version(registry.CHAMPION).version == 1
    assert registry.promote_champion(v2, expected_champion=v1) == v1
    assert registry.alias_version(registry.CHAMPION).version == 2
    assert registry.alias_version(registry.PREVIOUS).version == 1
    # retrying the same promotion is a no-op
    assert registry.promote_champion(v2, expected_champion=v1) == v1
