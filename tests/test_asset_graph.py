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
from test_preference_dagster import write_preference_spec

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"
PREFERENCE_SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph_preference.json"


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


def matches_snapshot(current: dict, snapshot: Path) -> bool:
    if os.environ.get("UPDATE_SNAPSHOTS"):
        snapshot.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    return current == json.loads(snapshot.read_text())


def test_asset_graph_matches_snapshot(tmp_path, tiny_model_dir):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store")
    guarded = build_pipeline_assets(spec, ROOT / "data_checks").blocking_checks
    assert matches_snapshot(describe(defs, guarded), SNAPSHOT)


def test_preference_asset_graph_matches_snapshot(tmp_path, tiny_model_dir):
    """The demo preference spec (assets/demo_preference.yaml, DPO and PPO): the SFT graph plus the
    preference assets; the pair gates are guarded apart from SFT's checks (`preference_guarded_checks`)."""
    spec = load_spec(write_preference_spec(tmp_path, tiny_model_dir))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store")
    pipeline = build_pipeline_assets(spec, ROOT / "data_checks")
    current = describe(defs, pipeline.blocking_checks)
    current["preference_guarded_checks"] = sorted(f"{k.asset_key.path[-1]}:{k.name}" for k in pipeline.preference_blocking_checks)
    assert matches_snapshot(current, PREFERENCE_SNAPSHOT)
    sft = describe(build_definitions([load_spec(write_spec(tmp_path, tiny_model_dir))], checks=ROOT / "data_checks",
                                     storage_root=tmp_path / "store"), [])
    assert set(sft["assets"]) < set(current["assets"])


def test_every_blocking_check_is_guarded_and_every_asset_is_in_the_pipeline_pool(tmp_path, tiny_model_dir):
    spec = load_spec(write_spec(tmp_path, tiny_model_dir))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store")
    graph = defs.resolve_asset_graph()
    guarded = set(build_pipeline_assets(spec, ROOT / "data_checks").blocking_checks)
    data_blocking = {k for k in graph.asset_check_keys if graph.get_check_spec(k).blocking
                     and k.asset_key.path[-1] not in ("evaluation_report",)}
    assert data_blocking == guarded
    assert {p for k in graph.get_all_asset_keys() for p in graph.get(k).pools} == {f"sft_{spec.name}"}


def test_every_blocking_pair_gate_is_guarded_apart_from_sft(tmp_path, tiny_model_dir):
    spec = load_spec(write_preference_spec(tmp_path, tiny_model_dir))
    defs = build_definitions([spec], checks=ROOT / "data_checks", storage_root=tmp_path / "store")
    graph = defs.resolve_asset_graph()
    pipeline = build_pipeline_assets(spec, ROOT / "data_checks")
    pair_blocking = {k for k in graph.asset_check_keys if graph.get_check_spec(k).blocking
                     and k.asset_key.path[-1] == "preference_pairs"}
    assert pair_blocking == set(pipeline.preference_blocking_checks)
    assert not pair_blocking & set(pipeline.blocking_checks)  # a failed pair gate never stops SFT
    assert {p for k in graph.get_all_asset_keys() for p in graph.get(k).pools} == {f"sft_{spec.name}"}
