"""`gan-launch k8s` (launch/k8s/): the manifests of the three targets, their offline validation, the container's
command, and the cluster calls against a fake API (no cluster)."""
from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from launch.cli import main as gan_launch
from launch.k8s import Apis, ManifestError, apply, container_command, pod_env, render_job, validate_manifests
from launch.k8s.command import expand_like_kubelet
from launch.k8s.render import TARGETS, TRAINJOB_RUNTIME_SETS

ROOT = Path(__file__).resolve().parents[2]
# Hydra-valid overrides with spaces, both quotes, $, braces, brackets and $(VAR) (which the kubelet would expand).
TRICKY = ["train.kimg=12", "+note='a b $HOME {x} \"q\" $(NCCL_DEBUG)'", "logger.tags=[a,'b c']", "+x=\"it's\""]


def _render(target: str, nodes: int = 3, overrides: list[str] = TRICKY, **kw) -> list[dict]:
    return render_job(target=target, nodes=nodes, gpus_per_node=8, image=None, name="gan-a", namespace="ml",
                      overrides=overrides, **kw)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {t: _render(t) for t in TARGETS}


def _workload(manifests: list[dict]) -> dict:
    """The job itself: not its Service, not its TrainingRuntime."""
    return next(m for m in manifests if m["kind"] not in ("Service", "TrainingRuntime"))


def _runtime_pod(manifests: list[dict]) -> dict:
    """The pod spec of the `node` job of a trainjob target's own TrainingRuntime."""
    runtime = next(m for m in manifests if m["kind"] == "TrainingRuntime")
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    return node["template"]["spec"]["template"]["spec"]


def _containers_and_pods(manifests: list[dict]) -> list[tuple[dict, dict | None]]:
    """(container, pod spec) of every pod template; a TrainJob's trainer comes last, without a pod spec (None): its
    pod is the runtime's, which Trainer fills in with the trainer's fields."""
    m = _workload(manifests)
    if m["kind"] == "Job":
        pod = m["spec"]["template"]["spec"]
        return [(pod["containers"][0], pod)]
    if m["kind"] == "PyTorchJob":
        return [(r["template"]["spec"]["containers"][0], r["template"]["spec"])
                for r in m["spec"]["pytorchReplicaSpecs"].values()]
    pod = _runtime_pod(manifests)
    return [(pod["containers"][0], pod), (m["spec"]["trainer"], None)]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("target", TARGETS)
def test_overrides_reach_the_process_verbatim_as_one_arg_each(rendered, target):
    for container, _ in _containers_and_pods(rendered[target]):
        args = container["args"]
        plain = {k: v.get("value", "") for k, v in _env(container).items()}
        received = [expand_like_kubelet(a, plain) for a in args]  # what the kubelet hands the process
        assert received[-len(TRICKY):] == TRICKY
        assert received[:5] == ["trainer.num_nodes=3", "trainer.devices=8", "paths.output_dir=/mnt/gan/runs",
                                "run.name=gan-a", "resume=auto"]
        assert container["command"] == ["/app/k8s/entrypoint.sh"]
        assert not any("WANDB" in a for a in args)


def test_resume_given_by_the_user_is_kept():
    argv = container_command(nodes=2, gpus_per_node=1, name="r", runs_dir="/v/runs", overrides=["resume=/v/x.ckpt"])
    assert "resume=auto" not in argv and argv[-1] == "resume=/v/x.ckpt"


@pytest.mark.parametrize("target", TARGETS)
def test_every_manifest_has_what_a_preemptible_gpu_job_needs(rendered, target):
    for m in rendered[target]:
        assert m["metadata"]["namespace"] == "ml" and m["metadata"]["labels"]["gan-pipeline/job"] == "gan-a"
    for container, pod in _containers_and_pods(rendered[target]):
        resources = container.get("resources") or container["resourcesPerNode"]
        for part in ("requests", "limits"):
            assert resources[part]["nvidia.com/gpu"] == "8" and {"cpu", "memory"} <= resources[part].keys()
        env = _env(container)
        assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY",
                                        "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
        assert {"NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG"} <= env.keys()
        assert env["GAN_NNODES"]["value"] == "3" and env["GAN_NPROC_PER_NODE"]["value"] == "8"
        if pod is None:  # a TrainJob's trainer: the rest of its pod is the runtime's, checked as the other pair
            continue
        mounts = container["volumeMounts"]
        assert pod["terminationGracePeriodSeconds"] == 60 + 30  # train.preempt_grace_s + launch.grace_margin_s
        assert pod["restartPolicy"] in ("Never", "OnFailure")
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
        assert container["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000,
                                                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
        assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "gan-data"}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in mounts
        assert {"name": "data", "mountPath": "/mnt/gan"} in mounts
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_trainjob_runs_on_its_own_runtime_which_sets_what_a_trainjob_cannot():
    manifests = _render("trainjob", overrides=["train.preempt_grace_s=200"],
                        launch_overrides=["launch.priority_class=high"])
    runtime, job = manifests  # the runtime first: `apply` creates them in this order
    assert (runtime["apiVersion"], runtime["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime")
    assert job["spec"]["runtimeRef"] == {"name": runtime["metadata"]["name"], "kind": "TrainingRuntime",
                                         "apiGroup": "trainer.kubeflow.org"}
    assert runtime["metadata"]["namespace"] == job["metadata"]["namespace"] == "ml"  # namespaced: same namespace
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 3, "torch": {"numProcPerNode": 8}}
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node" and node["template"]["spec"]["backoffLimit"] == 3
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pod = _runtime_pod(manifests)
    assert set(TRAINJOB_RUNTIME_SETS) <= pod.keys()
    assert pod["terminationGracePeriodSeconds"] == 200 + 30 and pod["priorityClassName"] == "high"
    assert pod["restartPolicy"] == "Never"  # a failed pod is replaced (backoffLimit) and resumes
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                      "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
    (container,) = pod["containers"]
    assert container["name"] == "node" and container["image"] == "ghcr.io/example/gan-pipeline:latest"
    assert "ports" not in container  # Trainer adds its rendezvous port; a second one would clash
    trainer = job["spec"]["trainer"]  # what Trainer writes into the `node` container: the same as the runtime's
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 8
    assert {k: trainer[k] for k in ("image", "command", "args", "env")} == \
        {k: container[k] for k in ("image", "command", "args", "env")}
    assert trainer["resourcesPerNode"] == container["resources"]
    assert "podTemplateOverrides" not in job["spec"] and "annotations" not in job["metadata"]
    validate_manifests(manifests)


def test_trainjob_on_a_cluster_training_runtime_leaves_the_pod_fields_to_it():
    (m,) = _render("trainjob", launch_overrides=["launch.trainjob_runtime=torch-distributed"])
    assert m["spec"]["runtimeRef"] == {"name": "torch-distributed"}  # kind defaults to ClusterTrainingRuntime
    assert m["spec"]["trainer"]["numNodes"] == 3 and m["spec"]["trainer"]["numProcPerNode"] == 8
    override = m["spec"]["podTemplateOverrides"][0]
    assert override["targetJobs"] == [{"name": "node"}]
    assert not set(TRAINJOB_RUNTIME_SETS) & override["spec"].keys()  # the API has no such fields
    volumes = {v["name"]: v for v in override["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "gan-data"}
    assert {"name": "data", "mountPath": "/mnt/gan"} in override["spec"]["containers"][0]["volumeMounts"]
    assert override["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert m["metadata"]["annotations"]["gan-pipeline/termination-grace-period-seconds"] == "90"
    validate_manifests([m])
    broken = copy.deepcopy(m)
    broken["spec"]["podTemplateOverrides"][0]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] = []
    with pytest.raises(ManifestError, match="trainer pod"):
        validate_manifests([broken])


def test_indexed_job_runs_static_rendezvous_on_pod_0s_dns_name(rendered):
    service, job = rendered["indexed-job"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"gan-pipeline/job": "gan-a"}
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == \
        ("Indexed", 3, 3, 3)
    assert pod["restartPolicy"] == "Never" and pod["subdomain"] == service["metadata"]["name"]
    assert job["spec"]["template"]["metadata"]["labels"]["gan-pipeline/job"] == "gan-a"
    env = {k: v["value"] for k, v in _env(pod["containers"][0]).items() if "value" in v}
    assert env["GAN_MASTER_ADDR"] == "gan-a-0.gan-a.ml.svc" and env["GAN_MASTER_PORT"] == "29500"
    # pod_env(i) is what pod i sees (Kubernetes adds JOB_COMPLETION_INDEX); the entrypoint makes it the node rank.
    assert pod_env(2, nodes=3, gpus_per_node=8, port=29500, max_restarts=3, cache_dir="/mnt/gan/cache",
                   nccl_env={"NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_DISABLE": "0"},
                   master_addr="gan-a-0.gan-a.ml.svc") == {**env, "JOB_COMPLETION_INDEX": "2"}


@pytest.mark.parametrize("env, rank, master", [
    ({"JOB_COMPLETION_INDEX": "2", "GAN_MASTER_ADDR": "gan-a-0.gan-a.ml.svc"}, "2", "gan-a-0.gan-a.ml.svc"),
    ({"RANK": "1", "MASTER_ADDR": "gan-a-master-0", "MASTER_PORT": "23456"}, "1", "gan-a-master-0"),   # PyTorchJob
    ({"PET_NODE_RANK": "1", "PET_MASTER_ADDR": "gan-a-node-0-0.gan-a"}, "1", "gan-a-node-0-0.gan-a"),  # TrainJob
])
def test_entrypoint_builds_the_torchrun_line_from_the_environment(tmp_path, env, rank, master):
    echo = tmp_path / "python"
    echo.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    echo.chmod(0o755)
    run_env = {"PATH": os.environ["PATH"], "PYTHON": str(echo), "GAN_NNODES": "3", "GAN_NPROC_PER_NODE": "8",
               "GAN_MAX_RESTARTS": "2", **env}
    out = subprocess.run([str(ROOT / "k8s/entrypoint.sh"), *TRICKY], env=run_env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    port = env.get("MASTER_PORT", "29500")
    assert out == ["-m", "torch.distributed.run", "--nnodes", "3", "--node-rank", rank, "--nproc-per-node", "8",
                   "--master-addr", master, "--master-port", port, "--max-restarts", "2", "-m", "pipeline.train",
                   *TRICKY]


def test_pytorchjob_master_and_workers(rendered):
    (job,) = rendered["pytorchjob"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    for r in replicas.values():
        assert r["restartPolicy"] == "OnFailure"
        container = r["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch" and container["ports"][0]["name"] == "pytorchjob-port"
    assert "Worker" not in _workload(_render("pytorchjob", nodes=1))["spec"]["pytorchReplicaSpecs"]


@pytest.mark.parametrize("target", TARGETS)
def test_manifests_pass_the_schemas_and_broken_ones_fail(rendered, target):
    validate_manifests(rendered[target])
    broken = copy.deepcopy(rendered[target])
    container, pod = _containers_and_pods(broken)[0]
    container["env"][0]["value"] = 3  # env values are strings
    with pytest.raises(ManifestError, match="env"):
        validate_manifests(broken)
    typo = copy.deepcopy(rendered[target])
    _workload(typo)["spec"]["backofLimit"] = 3  # an unknown field: the API server would drop it silently
    with pytest.raises(ManifestError, match="backofLimit"):
        validate_manifests(typo)


def test_core_parts_of_every_target_are_checked_strictly(rendered):
    service, job = copy.deepcopy(rendered["indexed-job"])
    job["spec"]["template"]["spec"]["volumes"][0]["emptyDir"]["medium"] = 5
    with pytest.raises(ManifestError, match="Job 'gan-a'"):
        validate_manifests([service, job])
    (pytorchjob,) = copy.deepcopy(rendered["pytorchjob"])  # the CRD leaves the pod spec open; the core schema not
    pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(ManifestError, match="Worker template"):
        validate_manifests([pytorchjob])
    trainjob = copy.deepcopy(rendered["trainjob"])  # the runtime's CRD leaves its pod spec open too
    _runtime_pod(trainjob)["volumes"][0]["emptyDir"]["sizeLimit"] = []
    with pytest.raises(ManifestError, match="TrainingRuntime 'gan-a' node template"):
        validate_manifests(trainjob)
    trainjob = copy.deepcopy(rendered["trainjob"])
    _runtime_pod(trainjob)["securityContext"]["runAsNonRoot"] = "yes"
    with pytest.raises(ManifestError, match="runAsNonRoot"):
        validate_manifests(trainjob)
    trainjob = copy.deepcopy(rendered["trainjob"])
    _workload(trainjob)["spec"]["trainer"]["env"][-1]["valueFrom"]["secretKeyRef"]["key"] = 5  # open in the CRD
    with pytest.raises(ManifestError, match="trainer pod"):
        validate_manifests(trainjob)


def test_the_training_runtime_is_checked_against_its_crd(rendered):
    runtime, _ = rendered["trainjob"]
    for path, value, message in [(("spec", "mlPolicy", "torch", "numProcPerNode"), [8], "numProcPerNode"),
                                  (("spec", "mlPolicy", "numnodes"), 3, "numnodes"),  # unknown: pruned by the API
                                  (("spec", "template", "spec", "replicatedJobs", 0, "template", "spec",
                                    "backofLimit"), 3, "backofLimit"),
                                  (("spec", "template", "spec", "replicatedJobs", 0, "replicas"), "1", "replicas")]:
        broken = copy.deepcopy(runtime)
        parent = broken
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
        with pytest.raises(ManifestError, match=rf"TrainingRuntime 'gan-a': .*{message}.*trainingruntime"):
            validate_manifests([broken])
    nameless = copy.deepcopy(runtime)
    del nameless["spec"]["template"]["spec"]["replicatedJobs"][0]["name"]
    with pytest.raises(ManifestError, match="'name' is a required property"):
        validate_manifests([nameless])


@pytest.mark.parametrize("target", TARGETS)
def test_dry_run_prints_yaml_that_parses_back_to_the_manifests(capsys, target):
    with pytest.raises(SystemExit) as exited:
        gan_launch(["k8s", "--target", target, "--nodes", "3", "--gpus-per-node", "8", "--name", "gan-a",
                    "--namespace", "ml", "--dry-run", *TRICKY])
    assert exited.value.code == 0
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == _render(target)


def test_launch_overrides_change_the_cluster_settings_only():
    (job,) = _render("pytorchjob", launch_overrides=["launch.pvc_name=shared", "launch.shm_size=64Gi",
                                                     "+launch.node_selector.gpu=h100", "launch.priority_class=high"])
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["volumes"][1]["persistentVolumeClaim"]["claimName"] == "shared"
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"] == "64Gi"
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "high"
    (job,) = _render("pytorchjob", overrides=["train.preempt_grace_s=200"])
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["terminationGracePeriodSeconds"] == 230


class ApiError(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status  # as kubernetes.client.ApiException


class FakeApi:
    """Records every call as (method, kwargs); answers from `objects`, raises `errors` (HTTP status), and 404 for
    reads and deletes of anything else."""

    def __init__(self, objects: dict[str, object] | None = None, errors: dict[str, int] | None = None):
        self.calls, self.objects, self.errors = [], objects or {}, errors or {}

    def __getattr__(self, method: str):
        def call(**kwargs):
            self.calls.append((method, kwargs))
            if method in self.errors:
                raise ApiError(self.errors[method])
            if method in self.objects:
                return self.objects[method]
            if method.startswith(("read_", "get_", "delete_")):
                raise ApiError(404)
            return {"ok": True}
        return call


def _pod(name: str, labels: dict, phase: str = "Running") -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(name=name, labels=labels, creation_timestamp="t"),
                           status=SimpleNamespace(phase=phase))


def test_apply_creates_core_and_custom_objects():
    api = Apis(core=FakeApi(), batch=FakeApi(), custom=FakeApi())
    service, job = _render("indexed-job")
    apply([service, job], namespace="ml", api=api)
    assert api.core.calls == [("create_namespaced_service", {"namespace": "ml", "body": service})]
    assert api.batch.calls == [("create_namespaced_job", {"namespace": "ml", "body": job})]
    runtime, trainjob = _render("trainjob")
    apply([runtime, trainjob], namespace="ml", api=api)
    created = {"group": "trainer.kubeflow.org", "version": "v1alpha1", "namespace": "ml"}
    assert api.custom.calls == [("create_namespaced_custom_object", {**created, "plural": "trainingruntimes",
                                                                      "body": runtime}),  # first: the job needs it
                                ("create_namespaced_custom_object", {**created, "plural": "trainjobs",
                                                                      "body": trainjob})]


def test_gan_launch_k8s_applies_through_the_injected_api(capsys):
    api = Apis(core=FakeApi(), batch=FakeApi(), custom=FakeApi())
    with pytest.raises(SystemExit) as exited:
        gan_launch(["k8s", "--target", "pytorchjob", "--nodes", "2", "--name", "gan-a", "train.kimg=1"], api=api)
    assert exited.value.code == 0 and "created PyTorchJob gan-a in namespace default" in capsys.readouterr().out
    (method, kwargs), = api.custom.calls
    assert method == "create_namespaced_custom_object" and kwargs["plural"] == "pytorchjobs"
    exists = Apis(core=FakeApi(), batch=FakeApi(), custom=FakeApi(errors={"create_namespaced_custom_object": 409}))
    with pytest.raises(SystemExit) as exited:
        gan_launch(["k8s", "--target", "pytorchjob", "--name", "gan-a"], api=exists)
    assert exited.value.code == 2 and "gan-launch delete gan-a" in capsys.readouterr().err


def test_status_logs_delete_of_an_indexed_job(capsys):
    pods = [_pod("gan-a-1-xyz", {"batch.kubernetes.io/job-completion-index": "1"}, "Pending"),
            _pod("gan-a-0-abc", {"batch.kubernetes.io/job-completion-index": "0"})]
    job = SimpleNamespace(status=SimpleNamespace(conditions=[SimpleNamespace(type="Failed", status="True",
                                                                             message="BackoffLimitExceeded")]))
    api = Apis(core=FakeApi({"list_namespaced_pod": SimpleNamespace(items=pods),
                             "read_namespaced_pod_log": "step 1\n", "delete_namespaced_service": {}}),
               batch=FakeApi({"read_namespaced_job": job, "delete_namespaced_job": {}}), custom=FakeApi())
    for argv in (["status", "gan-a", "--namespace", "ml"], ["logs", "gan-a", "--namespace", "ml", "--node", "1"],
                 ["delete", "gan-a", "--namespace", "ml"]):
        with pytest.raises(SystemExit) as exited:
            gan_launch(argv, api=api)
        assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "Job gan-a: Failed=True" in out and "BackoffLimitExceeded" in out
    assert out.index("node 0  gan-a-0-abc  Running") < out.index("node 1  gan-a-1-xyz  Pending")
    assert "step 1" in out and "deleted Job gan-a, Service gan-a" in out
    assert ("list_namespaced_pod", {"namespace": "ml", "label_selector": "gan-pipeline/job=gan-a"}) in api.core.calls
    assert ("read_namespaced_pod_log", {"name": "gan-a-1-xyz", "namespace": "ml"}) in api.core.calls
    assert ("delete_namespaced_job", {"name": "gan-a", "namespace": "ml", "propagation_policy": "Foreground"}) \
        in api.batch.calls


def test_status_and_logs_of_a_pytorchjob(capsys):
    pods = [_pod("gan-a-worker-0", {"training.kubeflow.org/replica-type": "worker",
                                    "training.kubeflow.org/replica-index": "0"}),
            _pod("gan-a-master-0", {"training.kubeflow.org/replica-type": "master",
                                    "training.kubeflow.org/replica-index": "0"})]
    custom = FakeApi({"get_namespaced_custom_object": {"status": {"conditions": [{"type": "Running",
                                                                                   "status": "True"}]}},
                      "delete_namespaced_custom_object": {}})
    api = Apis(core=FakeApi({"list_namespaced_pod": SimpleNamespace(items=pods), "read_namespaced_pod_log": "w"}),
               batch=FakeApi(), custom=custom)
    for argv in (["status", "gan-a"], ["logs", "gan-a", "--node", "1"], ["delete", "gan-a"]):
        with pytest.raises(SystemExit):
            gan_launch(argv, api=api)
    out = capsys.readouterr().out
    assert "PyTorchJob gan-a: Running=True" in out and "node 1  gan-a-worker-0" in out
    assert ("read_namespaced_pod_log", {"name": "gan-a-worker-0", "namespace": "default"}) in api.core.calls
    assert "deleted PyTorchJob gan-a" in out


class CustomObjects(FakeApi):
    """CustomObjectsApi that holds objects by plural: reads and deletes of any other plural answer 404."""

    def __init__(self, present: dict[str, dict]):
        super().__init__()
        self.present = present

    def __getattr__(self, method: str):
        def call(**kwargs):
            self.calls.append((method, kwargs))
            if method.startswith(("get_", "delete_")) and kwargs["plural"] not in self.present:
                raise ApiError(404)
            return self.present.get(kwargs.get("plural"), {"ok": True})
        return call


def test_trainjob_apply_status_delete_take_its_runtime_along(capsys):
    api = Apis(core=FakeApi(), batch=FakeApi(), custom=CustomObjects({}))
    with pytest.raises(SystemExit) as exited:
        gan_launch(["k8s", "--target", "trainjob", "--nodes", "2", "--name", "gan-a", "train.kimg=1"], api=api)
    assert exited.value.code == 0 and "created TrainingRuntime, TrainJob gan-a" in capsys.readouterr().out
    assert [kw["plural"] for _, kw in api.custom.calls] == ["trainingruntimes", "trainjobs"]
    running = {"status": {"conditions": [{"type": "Running", "status": "True"}]}}
    api = Apis(core=FakeApi({"list_namespaced_pod": SimpleNamespace(items=[])}), batch=FakeApi(),
               custom=CustomObjects({"trainjobs": running, "trainingruntimes": {}}))
    for argv in (["status", "gan-a"], ["delete", "gan-a"]):
        with pytest.raises(SystemExit) as exited:
            gan_launch(argv, api=api)
        assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "TrainJob gan-a: Running=True" in out and "deleted TrainJob gan-a, TrainingRuntime gan-a" in out
    # A runtime left alone (its TrainJob failed to create) is no job for `status`, but `delete` removes it.
    api = Apis(core=FakeApi(), batch=FakeApi(), custom=CustomObjects({"trainingruntimes": {}}))
    with pytest.raises(SystemExit) as exited:
        gan_launch(["status", "gan-a"], api=api)
    assert exited.value.code == 2 and "no job 'gan-a'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gan_launch(["delete", "gan-a"], api=api)
    assert "deleted TrainingRuntime gan-a" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["k8s", "--name", "gan-a", "--nodes", "0"], "--nodes=0"),
    (["k8s", "--name", "Gan_A"], "must be a DNS label"),
    (["k8s", "--name", "a" * 62, "--nodes", "12"], "at most 60 characters"),
    (["k8s", "--name", "gan-a", "run.name=other"], "leave out run.name"),
    (["k8s", "--name", "gan-a", "paths.output_dir=/x"], "leave out paths.output_dir"),
    (["k8s", "--name", "gan-a", "trainer.devices=2"], "leave out trainer.devices"),
    (["k8s", "--name", "gan-a", "launch.pvc=x"], "launch.pvc"),
    (["k8s", "--name", "gan-a", "train.nope=1"], "train.nope"),
    (["logs", "gan-a", "--node", "5"], "no pod of node 5"),
    (["delete", "gan-a"], "no job 'gan-a'"),
])
def test_bad_inputs_exit_2_naming_the_fix(capsys, argv, message):
    api = Apis(core=FakeApi({"list_namespaced_pod": SimpleNamespace(items=[])}), batch=FakeApi(), custom=FakeApi())
    with pytest.raises(SystemExit) as exited:
        gan_launch(argv, api=api)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_train_config_does_not_include_the_launch_group():
    defaults = yaml.safe_load((ROOT / "conf/train.yaml").read_text())["defaults"]
    groups = {next(iter(d)) if isinstance(d, dict) else d for d in defaults}
    assert not {g for g in groups if g.lstrip("+/").split("@")[0] == "launch"}
