"""Talking to the cluster with the kubernetes Python client: create the manifests, show pods and conditions, read
a node's logs, delete a job. `api` is injectable (tests pass a fake); by default it is built from the kubeconfig,
or from the service account when running inside a cluster."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launch.k8s.render import JOB_LABEL

# Kubeflow kinds: (group, version, plural) for CustomObjectsApi. Jobs first: `delete` removes a TrainJob before the
# TrainingRuntime it runs on (render_job lists the runtime first, so `apply` creates it before the TrainJob).
CUSTOM = {"PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
          "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
          "TrainingRuntime": ("trainer.kubeflow.org", "v1alpha1", "trainingruntimes")}
JOB_KINDS = ("PyTorchJob", "TrainJob")  # what `status` reports; a TrainingRuntime is only a job's template
INDEX_LABELS = ("batch.kubernetes.io/job-completion-index",  # Indexed Job pods, and a TrainJob's (JobSet's) pods
                "training.kubeflow.org/replica-index")        # PyTorchJob pods (Master 0, Workers 0..N-2)


@dataclass
class Apis:
    core: Any    # kubernetes.client.CoreV1Api
    batch: Any   # kubernetes.client.BatchV1Api
    custom: Any  # kubernetes.client.CustomObjectsApi


def default_apis() -> Apis:
    from kubernetes import client, config
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return Apis(core=client.CoreV1Api(), batch=client.BatchV1Api(), custom=client.CustomObjectsApi())


def _status(e: Exception) -> int | None:
    return getattr(e, "status", None)  # kubernetes.client.ApiException carries the HTTP status


def apply(manifests: list[dict], *, namespace: str, api: Apis | None = None) -> None:
    """Create every object in `namespace`; an object that exists already is an error naming the fix."""
    api = api or default_apis()
    for m in manifests:
        kind, name = m["kind"], m["metadata"]["name"]
        try:
            if kind == "Service":
                api.core.create_namespaced_service(namespace=namespace, body=m)
            elif kind == "Job":
                api.batch.create_namespaced_job(namespace=namespace, body=m)
            elif kind in CUSTOM:
                group, version, plural = CUSTOM[kind]
                api.custom.create_namespaced_custom_object(group=group, version=version, namespace=namespace,
                                                           plural=plural, body=m)
            else:
                raise ValueError(f"gan-launch cannot create kind {kind}")
        except Exception as e:
            if _status(e) == 409:
                raise ValueError(f"{kind} {name!r} exists in namespace {namespace}: `gan-launch delete {name}` first "
                                 "(its checkpoints stay on the volume; resume=auto continues from them)") from e
            raise


def _get(call: Any, **kwargs: Any) -> Any:
    """The object, or None when it does not exist (404)."""
    try:
        return call(**kwargs)
    except Exception as e:
        if _status(e) == 404:
            return None
        raise


def node_index(pod: Any) -> int | None:
    labels = pod.metadata.labels or {}
    for key in INDEX_LABELS:
        if key in labels:
            worker = labels.get("training.kubeflow.org/replica-type", "").lower() == "worker"
            return int(labels[key]) + (1 if key.startswith("training.") and worker else 0)
    return None


def job_pods(name: str, *, namespace: str, api: Apis) -> list:
    pods = api.core.list_namespaced_pod(namespace=namespace, label_selector=f"{JOB_LABEL}={name}").items
    return sorted(pods, key=lambda p: (node_index(p) is None, node_index(p) or 0, p.metadata.name))


def job_conditions(name: str, *, namespace: str, api: Apis) -> tuple[str, list[tuple[str, str, str]]] | None:
    """(kind, [(type, status, message)]) of the job called `name`, whichever kind it is; None if there is none."""
    job = _get(api.batch.read_namespaced_job, name=name, namespace=namespace)
    if job is not None:
        conds = (job.status.conditions or []) if job.status else []
        return "Job", [(c.type, c.status, c.message or "") for c in conds]
    for kind in JOB_KINDS:
        group, version, plural = CUSTOM[kind]
        obj = _get(api.custom.get_namespaced_custom_object, group=group, version=version, namespace=namespace,
                   plural=plural, name=name)
        if obj is not None:
            conds = (obj.get("status") or {}).get("conditions") or []
            return kind, [(c.get("type", ""), c.get("status", ""), c.get("message", "")) for c in conds]
    return None


def status(name: str, *, namespace: str, api: Apis | None = None) -> str:
    api = api or default_apis()
    found = job_conditions(name, namespace=namespace, api=api)
    if found is None:
        raise ValueError(f"no job {name!r} in namespace {namespace} (give --namespace?)")
    kind, conds = found
    lines = [f"{kind} {name}: " + (", ".join(f"{t}={s}" for t, s, _ in conds) or "no conditions yet")]
    lines += [f"  {t}: {msg}" for t, s, msg in conds if msg and s == "True"]
    for pod in job_pods(name, namespace=namespace, api=api):
        lines.append(f"  node {node_index(pod)}  {pod.metadata.name}  {pod.status.phase}")
    return "\n".join(lines)


def logs(name: str, *, namespace: str, node: int = 0, tail: int | None = None, api: Apis | None = None) -> str:
    """The logs of node `node`'s pod (the newest, if the node's pod was replaced)."""
    api = api or default_apis()
    pods = [p for p in job_pods(name, namespace=namespace, api=api) if node_index(p) == node]
    if not pods:
        raise ValueError(f"no pod of node {node} of job {name!r} in namespace {namespace}: "
                         f"see `gan-launch status {name}`")
    pod = max(pods, key=lambda p: str(p.metadata.creation_timestamp or ""))
    kwargs = {"tail_lines": tail} if tail else {}
    return api.core.read_namespaced_pod_log(name=pod.metadata.name, namespace=namespace, **kwargs)


def delete(name: str, *, namespace: str, api: Apis | None = None) -> list[str]:
    """Delete the job and its Service or TrainingRuntime; Foreground propagation removes the pods before the job is
    gone."""
    api = api or default_apis()
    deleted = []
    if _get(api.batch.delete_namespaced_job, name=name, namespace=namespace,
            propagation_policy="Foreground") is not None:
        deleted.append(f"Job {name}")
    if _get(api.core.delete_namespaced_service, name=name, namespace=namespace) is not None:
        deleted.append(f"Service {name}")
    for kind, (group, version, plural) in CUSTOM.items():
        if _get(api.custom.delete_namespaced_custom_object, group=group, version=version, namespace=namespace,
                plural=plural, name=name, propagation_policy="Foreground") is not None:
            deleted.append(f"{kind} {name}")
    if not deleted:
        raise ValueError(f"no job {name!r} in namespace {namespace} (give --namespace?)")
    return deleted
