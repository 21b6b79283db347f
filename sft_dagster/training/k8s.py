"""A training run as a Kubernetes pod, through Dagster Pipes (`dagster-k8s`'s `PipesK8sClient`).

`training.launcher: k8s` launches the same worker as the subprocess launcher (`training/worker.py`,
under `torchrun --nproc-per-node=N` for N processes) in a pod of its own: the image and namespace come
from the `k8s_training` resource (the deployment), the GPUs, CPU, memory and node selector from the
spec's `training.pod` (the pipeline). The storage root is a PersistentVolumeClaim mounted in the pod
at the very path the Dagster code location uses, so the worker reads the split Parquet files and the
base model and writes the adapter, checkpoints and metrics where the asset expects them. Logs and the
final result come back through Pipes (the pod's log stream); the Dagster step waits for the pod.

`pod_spec` is a pure function (tested without a cluster against `dagster_k8s.pipes.build_pod_body`,
which turns it into the `V1Pod` the client creates).
"""

from __future__ import annotations

from pathlib import Path

from ..spec import PipelineSpec
from .launch import worker_command, worker_result, write_spec_json

CONTAINER = "sft-training"
STORAGE_VOLUME = "sft-storage"


def device_kind(spec: PipelineSpec) -> str:
    """The hardware a k8s training run gets, as part of its lineage (the Dagster host's device is not it)."""
    pod = spec.training.pod
    gpus = pod.gpu_count(spec.training.num_processes)
    selector = ",".join(f"{k}={v}" for k, v in sorted(pod.node_selector.items()))
    return f"k8s:{gpus}x{pod.gpu_resource}" + (f"[{selector}]" if selector else "") if gpus else "k8s:cpu"


def pod_spec(spec: PipelineSpec, command: list[str], storage_root: str | Path, storage_claim: str,
             env: dict[str, str] | None = None, image_pull_policy: str = "IfNotPresent",
             service_account: str | None = None, env_from_secrets: list[str] | None = None) -> dict:
    """The `base_pod_spec` of one training run: its container (command, resources, env, the storage
    volume), GPU tolerations, shared memory for torchrun, and never a restart (Pipes reports failures)."""
    training, pod = spec.training, spec.training.pod
    gpus = pod.gpu_count(training.num_processes)
    root = str(Path(storage_root))
    requests = {k: v for k, v in (("cpu", pod.cpu), ("memory", pod.memory)) if v}
    limits = {**requests, **({pod.gpu_resource: str(gpus)} if gpus else {})}
    mounts = [{"name": STORAGE_VOLUME, "mountPath": root}]
    volumes = [{"name": STORAGE_VOLUME, "persistentVolumeClaim": {"claimName": storage_claim}}]
    if training.num_processes > 1:  # torchrun ranks exchange tensors through /dev/shm (NCCL, gloo)
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    container = {
        "name": CONTAINER,
        "command": command,
        "env": [{"name": k, "value": v} for k, v in {"SFT_DAGSTER_STORAGE": root, "PYTHONUNBUFFERED": "1",
                                                       **(env or {})}.items()],
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        "imagePullPolicy": image_pull_policy,
    }
    if env_from_secrets:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in env_from_secrets]
    out = {"containers": [container], "volumes": volumes, "restartPolicy": "Never"}
    if gpus:
        out["tolerations"] = [{"key": pod.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    if pod.node_selector:
        out["nodeSelector"] = dict(pod.node_selector)
    if service_account:
        out["serviceAccountName"] = service_account
    return out


def pod_command(spec: PipelineSpec, spec_json: Path, model_dir: Path, train_path: Path, val_path: Path,
                output_dir: Path) -> list[str]:
    """The worker inside the image: `python` / `torchrun` from the image's PATH, the device picked there."""
    return worker_command(spec, spec_json, model_dir, train_path, val_path, output_dir, "auto",
                          python="python", torchrun="torchrun")


def launch_training_k8s(context, k8s, spec: PipelineSpec, model_dir: Path, train_path: Path, val_path: Path,
                        output_dir: Path, storage_root: str | Path, env: dict[str, str] | None = None) -> dict:
    """Run the worker in a pod (`k8s` is the `K8sTraining` resource) and return what it reported."""
    from dagster_k8s import PipesK8sClient

    spec_json = write_spec_json(spec, output_dir)
    command = pod_command(spec, spec_json, model_dir, train_path, val_path, output_dir)
    base = pod_spec(spec, command, storage_root, k8s.storage_claim, env=env, image_pull_policy=k8s.image_pull_policy,
                    service_account=k8s.service_account, env_from_secrets=k8s.env_from_secrets)
    context.log.info(f"launching a pod ({k8s.image}, namespace {k8s.namespace}): {' '.join(command)}")
    client = PipesK8sClient(load_incluster_config=k8s.load_incluster_config, kubeconfig_file=k8s.kubeconfig_file)
    invocation = client.run(context=context, image=k8s.image, namespace=k8s.namespace, base_pod_spec=base,
                            base_pod_meta={"labels": {"app.kubernetes.io/name": "sft-training",
                                                      "sft-dagster/pipeline": spec.name}})
    return worker_result(invocation, spec, output_dir)
