"""Manifests of a multi-node gan-train job: an Indexed Job plus a headless Service, a Kubeflow PyTorchJob, or a
Kubeflow Trainer TrainJob (with its own TrainingRuntime unless launch.trainjob_runtime names a shared one). Plain
dicts, ready for YAML or the Kubernetes API; hyperparameters stay in the Hydra overrides, which go into the
container's args one per item."""
from __future__ import annotations

import copy
import re

from launch.k8s.command import check_user_overrides, container_command, escape_expansion, node_env
from launch.k8s.settings import LaunchSettings, load_settings

TARGETS = ("indexed-job", "pytorchjob", "trainjob")
JOB_LABEL = "gan-pipeline/job"  # on every object and pod: `gan-launch status|logs|delete` find them by it
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # RFC 1035 label: Services and TrainJobs need the leading letter
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
# Pod fields the TrainJob API (trainer.kubeflow.org/v1alpha1) cannot override: the runtime's pod template sets them.
TRAINJOB_RUNTIME_SETS = ("securityContext", "terminationGracePeriodSeconds", "priorityClassName", "restartPolicy")
OWN_RUNTIME = "own"  # launch.trainjob_runtime: render a TrainingRuntime per job (else: a ClusterTrainingRuntime name)


def _longest_suffix(target: str, nodes: int) -> str:
    """What the controllers append to the job name for the last pod's hostname (and the PyTorchJob's services)."""
    if target == "indexed-job":
        return f"-{nodes - 1}"
    if target == "pytorchjob":
        return f"-worker-{nodes - 2}" if nodes > 1 else "-master-0"
    return f"-node-0-{nodes - 1}"  # JobSet: <trainjob>-<replicated job>-<job index>-<pod index>


def check_inputs(*, target: str, nodes: int, gpus_per_node: int, name: str, overrides: list[str]) -> None:
    if target not in TARGETS:
        raise ValueError(f"--target={target!r}: choose one of {', '.join(TARGETS)}")
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must be >= 1")
    if not _NAME.match(name or ""):
        raise ValueError(f"--name={name!r} must be a DNS label: lower-case letters, digits and '-', starting with a "
                         "letter and ending with a letter or digit, e.g. --name biggan-256-a")
    suffix = _longest_suffix(target, nodes)
    if len(name) + len(suffix) > 63:
        raise ValueError(f"--name={name!r} is too long for {nodes} nodes as {target}: pod names add {suffix!r} and "
                         f"must fit 63 characters, so give a --name of at most {63 - len(suffix)} characters")
    check_user_overrides(overrides)


def _labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "gan-train", "app.kubernetes.io/managed-by": "gan-launch", JOB_LABEL: name}


def _env(s: LaunchSettings, *, nodes: int, gpus_per_node: int, master_addr: str | None) -> list[dict]:
    plain = node_env(nodes=nodes, gpus_per_node=gpus_per_node, port=s.port, max_restarts=s.max_restarts,
                     cache_dir=s.cache_dir, nccl_env=s.nccl_env, master_addr=master_addr)
    # The W&B key comes from a Secret: never in the args, so never in the logged config or `kubectl describe`.
    secret = {"name": "WANDB_API_KEY",
              "valueFrom": {"secretKeyRef": {"name": s.wandb_secret, "key": s.wandb_secret_key}}}
    return [*({"name": k, "value": v} for k, v in plain.items()), secret]


def _resources(s: LaunchSettings, gpus_per_node: int) -> dict:
    gpu = {"nvidia.com/gpu": str(gpus_per_node)}  # extended resources: requests must equal limits
    return {"requests": {**s.requests, **gpu}, "limits": {**s.limits, **gpu}}


def _volumes(s: LaunchSettings) -> list[dict]:
    # /dev/shm of a container is 64 MiB by default; DataLoader workers and NCCL need far more.
    return [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": s.shm_size}},
            {"name": "data", "persistentVolumeClaim": {"claimName": s.pvc_name}}]


def _mounts(s: LaunchSettings) -> list[dict]:
    return [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "data", "mountPath": s.mount_path}]


def _container_security(s: LaunchSettings) -> dict:
    return {"runAsNonRoot": True, "runAsUser": s.run_as_user, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}}


def _pod_security(s: LaunchSettings) -> dict:
    # fsGroup: the PVC's files stay writable by the non-root user on volumes that honour it.
    return {"runAsNonRoot": True, "runAsUser": s.run_as_user, "runAsGroup": s.run_as_user,
            "fsGroup": s.run_as_user, "seccompProfile": {"type": "RuntimeDefault"}}


def _container(s: LaunchSettings, *, name: str, argv: list[str], env: list[dict], gpus_per_node: int,
               image: str, port_name: str | None) -> dict:
    container = {"name": name, "image": image, "command": [escape_expansion(argv[0])],
                 "args": [escape_expansion(a) for a in argv[1:]], "env": env,
                 "resources": _resources(s, gpus_per_node), "volumeMounts": _mounts(s),
                 "ports": [{"name": port_name, "containerPort": s.port}], "securityContext": _container_security(s)}
    if port_name is None:  # the controller adds the rendezvous port itself
        del container["ports"]
    return container


def _pod_spec(s: LaunchSettings, *, container: dict, restart_policy: str, grace_s: int) -> dict:
    spec = {"restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": grace_s,  # train.preempt_grace_s + margin: SIGTERM -> last.ckpt -> exit
            "securityContext": _pod_security(s), "containers": [container], "volumes": _volumes(s)}
    if s.node_selector:
        spec["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        spec["tolerations"] = copy.deepcopy(s.tolerations)
    if s.priority_class:
        spec["priorityClassName"] = s.priority_class
    return spec


def _meta(name: str, namespace: str) -> dict:
    return {"name": name, "namespace": namespace, "labels": _labels(name)}


def _indexed_job(s: LaunchSettings, *, name: str, namespace: str, nodes: int, gpus_per_node: int, image: str,
                 argv: list[str], grace_s: int) -> list[dict]:
    # Pod i of an Indexed Job is <job>-<i>.<subdomain>; with a headless Service of that name it resolves, so node
    # 0's name is a master address known before any pod exists, and a rescheduled pod 0 keeps it.
    master = f"{name}-0.{name}.{namespace}.svc"
    env = _env(s, nodes=nodes, gpus_per_node=gpus_per_node, master_addr=master)
    container = _container(s, name="gan-train", argv=argv, env=env, gpus_per_node=gpus_per_node, image=image,
                           port_name="torchrun")
    pod = _pod_spec(s, container=container, restart_policy="Never", grace_s=grace_s)
    pod["subdomain"] = name
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, namespace),
               "spec": {"clusterIP": "None", "selector": {JOB_LABEL: name},
                        "publishNotReadyAddresses": True,  # resolvable before readiness: the rendezvous comes first
                        "ports": [{"name": "torchrun", "port": s.port, "targetPort": s.port}]}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(name, namespace),
           "spec": {"completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
                    "backoffLimit": s.backoff_limit,
                    "template": {"metadata": {"labels": _labels(name)}, "spec": pod}}}
    return [service, job]


def _pytorchjob(s: LaunchSettings, *, name: str, namespace: str, nodes: int, gpus_per_node: int, image: str,
                argv: list[str], grace_s: int) -> list[dict]:
    # The operator sets MASTER_ADDR, MASTER_PORT (from the port named pytorchjob-port), WORLD_SIZE=nodes and
    # RANK=node rank on every pod; the container must be named `pytorch`.
    env = _env(s, nodes=nodes, gpus_per_node=gpus_per_node, master_addr=None)
    container = _container(s, name="pytorch", argv=argv, env=env, gpus_per_node=gpus_per_node, image=image,
                           port_name="pytorchjob-port")

    def replica(count: int) -> dict:
        pod = _pod_spec(s, container=copy.deepcopy(container), restart_policy="OnFailure", grace_s=grace_s)
        return {"replicas": count, "restartPolicy": "OnFailure",  # a failed pod restarts and resumes (resume=auto)
                "template": {"metadata": {"labels": _labels(name)}, "spec": pod}}

    specs = {"Master": replica(1), **({"Worker": replica(nodes - 1)} if nodes > 1 else {})}
    return [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _meta(name, namespace),
             "spec": {"pytorchReplicaSpecs": specs, "nprocPerNode": str(gpus_per_node),
                      "runPolicy": {"backoffLimit": s.backoff_limit, "cleanPodPolicy": "None"}}}]


def _trainer(s: LaunchSettings, *, nodes: int, gpus_per_node: int, image: str, argv: list[str],
             env: list[dict]) -> dict:
    return {"image": image, "command": [escape_expansion(argv[0])],
            "args": [escape_expansion(a) for a in argv[1:]], "env": env, "numNodes": nodes,
            "numProcPerNode": gpus_per_node, "resourcesPerNode": _resources(s, gpus_per_node)}


def _training_runtime(s: LaunchSettings, *, name: str, namespace: str, nodes: int, gpus_per_node: int, image: str,
                      argv: list[str], env: list[dict], grace_s: int) -> dict:
    """The job's own TrainingRuntime: a JobSet with one replicated Job `node` whose pod template holds what the
    TrainJob cannot override (TRAINJOB_RUNTIME_SETS) and everything else of the pod; Trainer fills in the TrainJob's
    trainer fields and the PET_* variables, and sets the Job's parallelism and completions from numNodes."""
    container = _container(s, name="node", argv=argv, env=env, gpus_per_node=gpus_per_node, image=image,
                           port_name=None)  # Trainer adds the rendezvous port (PET_MASTER_PORT) to `node` itself
    # Never: a failed pod is replaced (same index, same hostname) up to backoffLimit and resumes, as with indexed-job.
    pod = _pod_spec(s, container=container, restart_policy="Never", grace_s=grace_s)
    # The ancestor label tells Trainer which replicated job runs the trainer (as its torch-distributed runtime has).
    job_labels = {**_labels(name), "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    node_job = {"name": "node", "replicas": 1,
                "template": {"metadata": {"labels": job_labels},
                             "spec": {"backoffLimit": s.backoff_limit,
                                      "template": {"metadata": {"labels": _labels(name)}, "spec": pod}}}}
    return {"apiVersion": TRAINER_API, "kind": "TrainingRuntime", "metadata": _meta(name, namespace),
            "spec": {"mlPolicy": {"numNodes": nodes, "torch": {"numProcPerNode": gpus_per_node}},
                     "template": {"metadata": {"labels": _labels(name)}, "spec": {"replicatedJobs": [node_job]}}}}


def _trainjob(s: LaunchSettings, *, name: str, namespace: str, nodes: int, gpus_per_node: int, image: str,
              argv: list[str], grace_s: int) -> list[dict]:
    # Trainer v2 sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR/PORT in the runtime's `node` container.
    env = _env(s, nodes=nodes, gpus_per_node=gpus_per_node, master_addr=None)
    trainer = _trainer(s, nodes=nodes, gpus_per_node=gpus_per_node, image=image, argv=argv, env=env)
    metadata = _meta(name, namespace)
    if s.trainjob_runtime == OWN_RUNTIME:
        # Our own namespaced TrainingRuntime (created first, deleted with the job) sets TRAINJOB_RUNTIME_SETS too.
        runtime = _training_runtime(s, name=name, namespace=namespace, nodes=nodes, gpus_per_node=gpus_per_node,
                                    image=image, argv=argv, env=copy.deepcopy(env), grace_s=grace_s)
        ref = {"name": name, "kind": "TrainingRuntime", "apiGroup": "trainer.kubeflow.org"}
        return [runtime, {"apiVersion": TRAINER_API, "kind": "TrainJob", "metadata": metadata,
                          "spec": {"runtimeRef": ref, "trainer": trainer, "labels": _labels(name)}}]
    # A shared ClusterTrainingRuntime: the TrainJob cannot set TRAINJOB_RUNTIME_SETS, that runtime's pod template must
    # (README); the rest of the pod goes through podTemplateOverrides.
    overrides = {"nodeSelector": dict(s.node_selector), "tolerations": copy.deepcopy(s.tolerations),
                 "volumes": _volumes(s), "containers": [{"name": "node", "volumeMounts": _mounts(s)}]}
    metadata["annotations"] = {"gan-pipeline/termination-grace-period-seconds": str(grace_s)}
    return [{"apiVersion": TRAINER_API, "kind": "TrainJob", "metadata": metadata,
             "spec": {"runtimeRef": {"name": s.trainjob_runtime}, "trainer": trainer, "labels": _labels(name),
                      "podTemplateOverrides": [{"targetJobs": [{"name": "node"}],
                                                "metadata": {"labels": _labels(name)},
                                                "spec": {k: v for k, v in overrides.items() if v}}]}}]


_RENDERERS = {"indexed-job": _indexed_job, "pytorchjob": _pytorchjob, "trainjob": _trainjob}


def render_job(*, target: str, nodes: int, gpus_per_node: int, image: str | None, name: str,
               namespace: str | None, overrides: list[str], launch_overrides: list[str] = (),
               launch_config: str = "default") -> list[dict]:
    """The manifests of one gan-train job; `overrides` go to gan-train verbatim, `launch_overrides` (launch.<key>=...)
    change conf/launch/<launch_config>.yaml."""
    check_inputs(target=target, nodes=nodes, gpus_per_node=gpus_per_node, name=name, overrides=overrides)
    s, preempt_grace_s = load_settings(overrides=list(overrides), launch_overrides=list(launch_overrides),
                                       config=launch_config)
    argv = container_command(nodes=nodes, gpus_per_node=gpus_per_node, name=name, runs_dir=s.runs_dir,
                             overrides=list(overrides))
    return _RENDERERS[target](s, name=name, namespace=namespace or s.namespace, nodes=nodes,
                              gpus_per_node=gpus_per_node, image=image or s.image, argv=argv,
                              grace_s=preempt_grace_s + s.grace_margin_s)
