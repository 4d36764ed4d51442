"""The daemon's `metrics` text read by the Prometheus project's own Python parser.

Environment (set by ctest): WEIGHTD_BIN, WEIGHTD_CLIENT_LIB, PYTHONPATH=client/python. The parser
(prometheus_client.parser.text_string_to_metric_families) turns every sample that does not follow
its family's HELP/TYPE lines into an untyped family of its own, so a family split in two, or
samples of two families interleaved, show up as repeated or untyped families.
"""
import gc
import os
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import weightd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_client_python import demo_daemon  # noqa: E402

# Family name as the parser reports it (counters lose their _total suffix) -> type.
EXPECTED = {
    "weightd_models": "gauge",
    "weightd_loads": "counter",
    "weightd_loads_failed": "counter",
    "weightd_loads_running": "gauge",
    "weightd_attaches": "counter",
    "weightd_detaches": "counter",
    "weightd_loaded_bytes": "counter",
    "weightd_checkpoint_bytes_read": "counter",
    "weightd_models_adopted": "counter",
    "weightd_updates": "counter",
    "weightd_updates_failed": "counter",
    "weightd_rollbacks": "counter",
    "weightd_refreshes": "counter",
    "weightd_model_generation": "gauge",
    "weightd_model_generations_held": "gauge",
    "weightd_rank_ready": "gauge",
    "weightd_rank_arena_bytes": "gauge",
    "weightd_rank_arenas": "gauge",
    "weightd_model_arena_bytes": "gauge",
    "weightd_rank_leases": "gauge",
    "weightd_load_bytes_done": "gauge",
    "weightd_load_bytes_total": "gauge",
    "weightd_connections": "gauge",
    "weightd_requests": "counter",
    "weightd_request_errors": "counter",
    "weightd_connections_refused": "counter",
    "weightd_connections_shed": "counter",
}


@pytest.fixture(scope="module")
def daemon():
    # Two models, one of two ranks: per-model and per-rank families have several samples each.
    with demo_daemon("weightd-metrics-") as (_, sock, _, c):
        yield {"client": c, "socket": sock}


def scrape(client):
    families = list(text_string_to_metric_families(client.metrics()))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), f"families split or interleaved: {names}"
    return {f.name: f for f in families}


def value(family, **labels):
    matches = [s.value for s in family.samples if s.labels == labels]
    assert len(matches) == 1, f"{family.name}{labels}: {family.samples}"
    return matches[0]


def test_every_family_is_one_typed_documented_group(daemon):
    families = scrape(daemon["client"])
    assert {n: f.type for n, f in families.items()} == EXPECTED
    for f in families.values():
        assert f.documentation, f"{f.name} has no HELP line"
        assert f.samples, f"{f.name} has no sample"


def test_values(daemon):
    c = daemon["client"]
    w = c.attach("demo", backend="numpy")
    families = scrape(c)
    assert value(families["weightd_models"]) == 2
    assert value(families["weightd_loads"]) == 2
    assert value(families["weightd_loads_failed"]) == 0
    assert value(families["weightd_loads_running"]) == 0
    assert value(families["weightd_attaches"]) >= 1
    assert value(families["weightd_connections"]) >= 1
    for rank in ("0", "1"):
        assert value(families["weightd_rank_ready"], model="llama2", rank=rank) == 1
        assert value(families["weightd_rank_arena_bytes"], model="llama2", rank=rank) > 0
    assert value(families["weightd_rank_leases"], model="demo", rank="0") == 1
    for model in ("demo", "llama2"):
        total = value(families["weightd_load_bytes_total"], model=model)
        assert total > 0
        assert value(families["weightd_load_bytes_done"], model=model) == total
    del w
    gc.collect()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        families = scrape(c)
        if value(families["weightd_rank_leases"], model="demo", rank="0") == 0:
            break
        time.sleep(0.05)
    assert value(families["weightd_rank_leases"], model="demo", rank="0") == 0
    assert value(families["weightd_detaches"]) >= 1
