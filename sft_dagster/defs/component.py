"""A pipeline spec as a Dagster Component: `type: sft_dagster.SFTPipeline`, the spec's fields as attributes.

The attribute schema *is* `PipelineSpec` (`spec/`): the same pydantic model validates `assets/*.yaml`
and a component's `defs.yaml`, so `dg check yaml` reports the errors `sft-dagster run` would, with the
file and line. Relative paths in the attributes resolve against the component's folder, as they do
against a spec file's folder. The component builds exactly what `build_definitions` builds for one spec
(`pipeline_definitions` + `shared_resources`), so a `dg` project and `workspace.yaml` load the same graph.

In a `dg` project (`[tool.dg.project] registry_modules = ["sft_dagster"]`, or the installed package's
`dagster_dg_cli.registry_modules` entry point):

    dg scaffold defs sft_dagster.SFTPipeline my_pipeline   # defs/my_pipeline/defs.yaml with a starter spec
    dg check yaml                                         # validates the attributes against PipelineSpec
"""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg

from ..spec import PipelineSpec
from ..storage import default_storage_root


class SFTPipelineScaffolder(dg.Scaffolder):
    """`dg scaffold defs sft_dagster.SFTPipeline NAME`: a defs.yaml holding a small valid spec to edit."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        from dagster.components.component_scaffolding import scaffold_component

        name = re.sub(r"[^a-z0-9_]", "_", request.target_path.name.lower()).lstrip("_0123456789") or "pipeline"
        scaffold_component(request, {
            "name": name,
            "task": {"type": "classification", "labels": ["negative", "positive"], "prompt_template": "{prompt}"},
            "sources": [{"path": "data/*.jsonl", "columns": {"prompt": "text", "response": "label"}}],
            "training": {"method": "lora", "epochs": 1},
        })


@dg.scaffold_with(SFTPipelineScaffolder)
class SFTPipeline(dg.Component):
    """One supervised fine-tuning pipeline (an sft_dagster spec): data, quality gates, training,
    evaluation and promotion as one asset group with its job, schedule and sensors."""

    def __init__(self, spec: PipelineSpec):
        self.spec = spec

    @classmethod
    def get_model_cls(cls) -> type[PipelineSpec]:
        return PipelineSpec

    @classmethod
    def load(cls, attributes: PipelineSpec | None, context: dg.ComponentLoadContext) -> "SFTPipeline":
        if attributes is None:
            raise dg.DagsterInvalidDefinitionError(f"{context.path}: an SFTPipeline needs a spec as its attributes")
        folder = context.path if context.path.is_dir() else context.path.parent
        return cls(attributes.model_copy(update={"spec_path": (folder / "defs.yaml").resolve()}))

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from . import pipeline_definitions, shared_resources

        return dg.Definitions.merge(pipeline_definitions(self.spec),
                                    dg.Definitions(resources=shared_resources(str(default_storage_root()))))
