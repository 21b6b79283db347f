"""A snapshot of the asset graph's wiring: keys, dependencies, checks with their blocking flags, pools,
IO managers and the set of checks the cross-run guard enforces.

A change to the wiring fails this test until the snapshot is regenerated on purpose:
`UPDATE_SNAPSHOTS=1 pytest tests/test_asset_graph.py`, and the diff of the JSON file is reviewed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sft_dagster.defs import build_definitions
from sft_dagster.defs.pipeline import build_pipeline_assets
from sft_dagster.spec import load_spec

from test_pipeline_dagster import ROOT, write_spec

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


def describe(defs, guarded) -> dict:
    graph = defs.resolve_asset_graph()
    name = lambda key: "/".join(key.path[1:])  # noqa: E731  (the pipeline prefix is the same everywhere)
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.path):
        node = graph.get(key)
        assets[name(key)] = {
            "deps": sorted(name(k) for k in node.parent_keys),
            "checks": {c.name: {"blocking": graph.get_check_spec(c).blocking,
                                "additional_deps": sorted(name(d.asset_key) for d in graph.get_check_spec(c).additional_deps)}
                       for c in sorted(node.check_keys, key=lambda c: c.name)},
            "pools": sorted(node.pools),
            "io_manager": node.io_manager_key,
            "executes_with": sorted(name(k) for k in node.execution_set_asset_keys if k != key),
        }
    return {"assets": assets, "guarded_checks": sorted(f"{name(k.asset_key)}:{k.name}" for k in guarded)}


def test_asset_graph_matches_snapshot(tmp_path, tiny_model_dir):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store")
    guarded = build_pipeline_assets(spec, ROOT / "data_checks").blocking_checks
    current = describe(defs, guarded)
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())


def test_every_blocking_check_is_guarded_and_every_asset_is_in_the_pipeline_pool(tmp_path, tiny_model_dir):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store")
    graph = defs.resolve_asset_graph()
    guarded = set(build_pipeline_assets(spec, ROOT / "data_checks").blocking_checks)
    data_blocking = {k for k in graph.asset_check_keys if graph.get_check_spec(k).blocking
                     and k.asset_key.path[-1] not in ("evaluation_report",)}
    assert data_blocking == guarded
    assert {p for k in graph.get_all_asset_keys() for p in graph.get(k).pools} == {f"sft_{spec.name}"}
