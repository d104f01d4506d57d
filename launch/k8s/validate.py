"""Offline checks of rendered manifests: core kinds against Kubernetes' own schemas (kubernetes-validate, strict,
its bundled schemas of a pinned version), the Kubeflow kinds against their CRDs' openAPIV3Schema (k8s/crds/)."""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

K8S_VERSION = "1.33.0"  # the oldest cluster we target: Indexed Jobs with pod hostnames, sidecar-free GPU pods
CRD_DIR = Path(__file__).resolve().parents[2] / "k8s" / "crds"
CRD_SCHEMAS = {("kubeflow.org/v1", "PyTorchJob"): "pytorchjob.openapi.yaml",
               ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainjob.openapi.yaml",
               ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): "trainingruntime.openapi.yaml"}
CORE_KINDS = {("v1", "Service"), ("batch/v1", "Job"), ("v1", "PodTemplate"), ("v1", "Pod")}


class ManifestError(ValueError):
    """A rendered manifest that the API server would reject (or prune); the message names the object and field."""


def _closed(schema: dict) -> dict:
    """The API server drops fields a CRD does not declare (and `--validate=strict` reports them); reject them here
    too, except where the schema preserves unknown fields."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for sub in (*schema.get("properties", {}).values(), schema.get("items"), schema.get("additionalProperties"),
                    *schema.get("anyOf", ())):
            if isinstance(sub, dict):
                _closed(sub)
    return schema


@functools.cache
def crd_validator(filename: str):  # -> jsonschema.Draft202012Validator
    import jsonschema  # a dependency of kubernetes-validate (the dev extra), as is everything in this module

    schema = _closed(copy.deepcopy(yaml.safe_load((CRD_DIR / filename).read_text())))
    return jsonschema.Draft202012Validator(schema)


def _where(m: dict) -> str:
    return f"{m.get('kind')} {m.get('metadata', {}).get('name')!r}"


def _validate_core(m: dict, what: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(m, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise ManifestError(f"{what}: {path or '<root>'}: {e.message} (Kubernetes {K8S_VERSION} schema)") from e


def _validate_crd(m: dict, filename: str) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(crd_validator(filename).iter_errors(m))
    if error is not None:
        path = ".".join(str(p) for p in error.absolute_path)
        raise ManifestError(f"{_where(m)}: {path or '<root>'}: {error.message} (CRD schema k8s/crds/{filename})")


def _trainjob_as_pod(m: dict) -> dict:
    """The core/v1 parts a TrainJob carries, as the `node` pod the runtime would get them."""
    trainer, spec = m["spec"].get("trainer", {}), {"containers": []}
    container = {"name": "node", **{k: trainer[k] for k in ("image", "command", "args", "env") if k in trainer}}
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    for override in m["spec"].get("podTemplateOverrides", []):
        pod = override.get("spec", {})
        spec.update({k: pod[k] for k in ("volumes", "tolerations", "nodeSelector", "affinity") if k in pod})
        for c in pod.get("containers", []):
            if c["name"] == "node" and "volumeMounts" in c:
                container["volumeMounts"] = c["volumeMounts"]
    spec["containers"].append(container)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": m["metadata"]["name"]}, "spec": spec}


def _pod_templates(m: dict) -> list[tuple[str, dict]]:
    """(which, core/v1 PodTemplateSpec) of every pod template a PyTorchJob or TrainingRuntime holds."""
    if m["kind"] == "PyTorchJob":
        return [(replica, spec.get("template", {})) for replica, spec in m["spec"]["pytorchReplicaSpecs"].items()]
    jobs = m["spec"].get("template", {}).get("spec", {}).get("replicatedJobs", [])
    return [(job["name"], job["template"]["spec"]["template"]) for job in jobs]


def validate_manifest(m: dict) -> None:
    key = (m.get("apiVersion"), m.get("kind"))
    if key in CORE_KINDS:
        _validate_core(m, _where(m))
    elif key in CRD_SCHEMAS:
        _validate_crd(m, CRD_SCHEMAS[key])
        if m["kind"] == "TrainJob":
            _validate_core(_trainjob_as_pod(m), f"{_where(m)} trainer pod")
            return
        for which, template in _pod_templates(m):  # the CRD schema leaves the pod spec open: check it as what it is
            pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": m["metadata"]["name"]},
                            "template": template}
            _validate_core(pod_template, f"{_where(m)} {which} template")
    else:
        raise ManifestError(f"{_where(m)}: no schema for apiVersion={key[0]} kind={key[1]}")


def validate_manifests(manifests: list[dict]) -> None:
    for m in manifests:
        validate_manifest(m)
