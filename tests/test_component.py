"""The SFTPipeline component: a spec in a `dg` project loads the same asset graph as `assets/*.yaml` +
`workspace.yaml`, `dg scaffold defs` writes a spec that `dg check yaml` accepts, and a bad attribute is
reported with its file and line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

from sft_dagster.defs import build_definitions
from sft_dagster.defs.pipeline import build_pipeline_assets
from sft_dagster.spec import load_spec

from test_asset_graph import describe
from test_pipeline_dagster import ROOT, materialized, write_spec

PYPROJECT = """\
[project]
name = "{module}"
version = "0.1.0"
requires-python = ">=3.11"

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "{module}"
registry_modules = ["sft_dagster"]
"""

DEFINITIONS = """\
from pathlib import Path

import dagster as dg


@dg.definitions
def defs():
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
"""


def dg_project(root: Path, module: str) -> Path:
    """A minimal `dg` project (what `create-dagster project` lays out) that lists sft_dagster's components."""
    package = root / "src" / module
    (package / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT.format(module=module))
    (package / "__init__.py").write_text("")
    (package / "defs" / "__init__.py").write_text("")
    (package / "definitions.py").write_text(DEFINITIONS)
    return package / "defs"


def dg_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(project / "src")]),
           "VIRTUAL_ENV": sys.prefix, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).parent / "dg"), *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_component_loads_the_same_graph_as_the_workspace(tmp_path, tiny_model_dir, monkeypatch):
    spec_file = write_spec(tmp_path / "workspace", tiny_model_dir)
    workspace_defs = build_definitions([load_spec(spec_file)], checks=ROOT / "data_checks",
                                       storage_root=tmp_path / "store")

    # The same spec as a component's attributes, its data beside it (relative paths resolve against its folder).
    folder = dg_project(tmp_path / "project", "sft_component_project") / "tiny"
    shutil.copytree(spec_file.parent / "data", folder / "data")
    attributes = yaml.safe_load(spec_file.read_text())
    (folder / "defs.yaml").write_text(yaml.safe_dump({"type": "sft_dagster.SFTPipeline", "attributes": attributes}))
    monkeypatch.syspath_prepend(str(tmp_path / "project" / "src"))
    monkeypatch.setenv("SFT_DAGSTER_STORAGE", str(tmp_path / "component_store"))
    component_defs = dg.load_from_defs_folder(project_root=tmp_path / "project")

    guarded = build_pipeline_assets(load_spec(spec_file), ROOT / "data_checks").blocking_checks
    assert describe(component_defs, guarded) == describe(workspace_defs, guarded)
    names = lambda defs: ({j.name for j in defs.jobs}, {s.name for s in defs.schedules}, {s.name for s in defs.sensors})  # noqa: E731
    assert names(component_defs) == names(workspace_defs)
    assert set(component_defs.resources) == set(workspace_defs.resources)

    with dg.instance_for_test() as instance:
        job = component_defs.resolve_job_def("tiny_sentiment_job")
        result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(["tiny_sentiment", "raw_examples"]),
                                                                            dg.AssetKey(["tiny_sentiment", "ingest_quarantine"])])
    assert materialized(result) == {"raw_examples", "ingest_quarantine"}
    assert (tmp_path / "component_store" / "tiny_sentiment" / "tables" / "raw_examples.parquet").exists()


def test_dg_scaffolds_a_pipeline_and_checks_its_yaml(tmp_path):
    project = tmp_path / "project"
    defs = dg_project(project, "sft_dg_project")
    scaffold = dg_cli(project, "scaffold", "defs", "sft_dagster.SFTPipeline", "nightly_intents")
    assert scaffold.returncode == 0, scaffold.stdout + scaffold.stderr
    written = yaml.safe_load((defs / "nightly_intents" / "defs.yaml").read_text())
    assert written["type"] == "sft_dagster.SFTPipeline" and written["attributes"]["name"] == "nightly_intents"
    check = dg_cli(project, "check", "yaml")
    assert check.returncode == 0, check.stdout + check.stderr

    text = (defs / "nightly_intents" / "defs.yaml").read_text()
    (defs / "nightly_intents" / "defs.yaml").write_text(text.replace("method: lora", "methd: lora"))
    bad = dg_cli(project, "check", "yaml")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "method: lora" in t)
    assert bad.returncode != 0
    assert f"nightly_intents/defs.yaml:{line}" in bad.stdout + bad.stderr
    assert "attributes.training.methd" in bad.stdout + bad.stderr
