"""Training on Kubernetes through dagster-k8s Pipes, checked without a cluster: the pod a training run
gets (built by dagster-k8s's own `build_pod_body` from our `base_pod_spec`), and the manifests in
`deploy/k8s/` agreeing with the `k8s_training` resource."""

from __future__ import annotations

from pathlib import Path

import yaml
from dagster_k8s.pipes import build_pod_body

from sft_dagster.defs.resources import K8sTraining
from sft_dagster.spec import parse_spec
from sft_dagster.training.k8s import CONTAINER, device_kind, pod_command, pod_spec

ROOT = Path(__file__).resolve().parents[1]
STORAGE = "/data/sft"


def k8s_spec(**training):
    return parse_spec({
        "name": "intents", "task": {"type": "classification", "labels": ["a", "b"]},
        "sources": [{"path": "data.jsonl"}],
        "training": {"launcher": "k8s", "num_processes": 4, "method": "qlora",
                     "pod": {"cpu": "16", "memory": "64Gi", "node_selector": {"gpu": "h100"}}, **training},
    })


def build(spec, env=None):
    run_dir = Path(STORAGE) / spec.name / "training" / "abc123"
    command = pod_command(spec, run_dir / "spec.json", Path(STORAGE) / "models" / "base", run_dir / "data" / "train.parquet",
                          run_dir / "data" / "validation.parquet", run_dir)
    resource = K8sTraining()
    base = pod_spec(spec, command, STORAGE, resource.storage_claim, env=env, service_account=resource.service_account,
                    env_from_secrets=["mlflow-credentials"])
    # What PipesK8sClient.run creates: our base spec, the image, and Pipes' bootstrap variables.
    pod = build_pod_body("sft-train-1", "registry.example.com/sft-dagster:1", None,
                         {"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"}, None, base)
    return pod, run_dir


def test_a_training_pod_from_a_pipeline_spec():
    pod, run_dir = build(k8s_spec(), env={"MLFLOW_TRACKING_URI": "http://mlflow:5000", "SFT_DAGSTER_MLFLOW_RUN_ID": "r1"})
    (container,) = pod.spec.containers
    assert container.name == CONTAINER and container.image == "registry.example.com/sft-dagster:1"
    # torchrun inside the pod, one rank per GPU, the worker reading and writing under the storage root
    assert container.command[:4] == ["torchrun", "--standalone", "--nproc-per-node=4", "-m"]
    assert container.command[4] == "sft_dagster.training.worker"
    args = dict(zip(container.command[5::2], container.command[6::2]))
    assert args["--output-dir"] == str(run_dir) and args["--train"] == f"{run_dir}/data/train.parquet"
    assert args["--device"] == "auto"
    assert container.resources.limits == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert container.resources.requests == {"cpu": "16", "memory": "64Gi"}
    env = {e.name: e.value for e in container.env}
    assert env["SFT_DAGSTER_STORAGE"] == STORAGE and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["SFT_DAGSTER_MLFLOW_RUN_ID"] == "r1" and env["DAGSTER_PIPES_CONTEXT"] == "ctx"
    assert container.env_from[0].secret_ref.name == "mlflow-credentials"
    mounts = {m.name: m.mount_path for m in container.volume_mounts}
    volumes = {v.name: v for v in pod.spec.volumes}
    assert mounts == {"sft-storage": STORAGE, "dshm": "/dev/shm"}
    assert volumes["sft-storage"].persistent_volume_claim.claim_name == "sft-storage"
    assert volumes["dshm"].empty_dir.medium == "Memory"
    assert pod.spec.restart_policy == "Never" and pod.spec.node_selector == {"gpu": "h100"}
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu" and pod.spec.service_account_name == "sft-training"
    assert device_kind(k8s_spec()) == "k8s:4xnvidia.com/gpu[gpu=h100]"


def test_one_process_runs_python_and_gpus_follow_the_spec():
    pod, _ = build(k8s_spec(num_processes=1, pod={"gpus": 2, "memory": "16Gi"}))
    (container,) = pod.spec.containers
    assert container.command[:3] == ["python", "-m", "sft_dagster.training.worker"]
    assert container.resources.limits == {"memory": "16Gi", "nvidia.com/gpu": "2"}
    assert {v.name for v in pod.spec.volumes} == {"sft-storage"}  # no shared-memory volume for one process
    cpu_pod, _ = build(k8s_spec(num_processes=1, pod={"gpus": 0}))
    assert "nvidia.com/gpu" not in (cpu_pod.spec.containers[0].resources.limits or {})
    assert cpu_pod.spec.tolerations is None and device_kind(k8s_spec(num_processes=1, pod={"gpus": 0})) == "k8s:cpu"


def test_manifests_agree_with_the_training_resource():
    resource = K8sTraining()
    docs = [d for f in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs if "kind" in d}
    assert ("PersistentVolumeClaim", resource.storage_claim) in kinds
    assert ("ServiceAccount", resource.service_account) in kinds
    role = next(d for d in docs if d.get("kind") == "Role")
    assert {"create", "get", "watch", "delete"} <= set(role["rules"][0]["verbs"]) and role["rules"][1]["resources"] == ["pods/log"]
    values = yaml.safe_load((ROOT / "deploy" / "k8s" / "values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["SFT_DAGSTER_STORAGE_CLAIM"] == resource.storage_claim
    assert env["SFT_DAGSTER_TRAINING_SERVICE_ACCOUNT"] == resource.service_account
    # the code location, the run pods and (through pod_spec) the training pods mount the root at one path
    assert deployment["volumeMounts"][0]["mountPath"] == env["SFT_DAGSTER_STORAGE"]
    assert values["runLauncher"]["config"]["k8sRunLauncher"]["volumeMounts"][0]["mountPath"] == env["SFT_DAGSTER_STORAGE"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "sft_dagster.definitions"]
