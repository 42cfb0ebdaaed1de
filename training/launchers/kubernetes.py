"""Kubernetes launcher of ``training.pipeline``: each stage runs as the Job the Helm chart rendered for it.

    python -m training.pipeline --config /etc/colossal-rlhf/pipeline/pipeline.yaml  # its stages: launcher kubernetes
    python -m training.launchers.kubernetes apply serving                          # serving, once the model exists

The chart's orchestrator Job (a CPU-only pod) runs these two commands. For a stage named S it reads the manifests
in ``$K8S_MANIFESTS/S.yaml`` (Services, then Jobs: a fetch Job before the first stage, an Indexed Job for a
multi-node stage), creates each object that is not there yet and follows every Job to its end before the next;
so no GPU pod exists while it would only wait. The orchestrator keeps its state in the API server: restarted, it
finds the Jobs it created (by name), follows a running one, skips a complete one, and recreates one whose manifest
changed (the ``colossal-rlhf/manifest-sha256`` annotation) once it has finished, or that had failed (so running the
orchestrator again after fixing the cause resumes the pipeline there). Created objects are owned by the
ConfigMap ``$K8S_OWNER_CONFIGMAP``, so ``helm uninstall`` removes them; the stage pods resume from their last
checkpoint on the PVC (``--resume``), and a stage whose manifest.json is there exits at once.

Uses the official ``kubernetes`` client: in a pod its ServiceAccount (a namespaced Role with exactly the verbs
used here: configmaps get; jobs get/create/delete; services get/create; deployments or rayservices
get/create/patch), elsewhere ``$KUBECONFIG``. Settings come from the environment the chart sets: K8S_NAMESPACE,
K8S_MANIFESTS, K8S_OWNER_CONFIGMAP, K8S_POLL_SECONDS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from training.config import ConfigError

if TYPE_CHECKING:
    from training.pipeline import PipelineConfig, StagePlan

CHECKSUM = "colossal-rlhf/manifest-sha256"
STAGE_FAILED = 3  # the orchestrator's exit code for a stage Job that failed (the chart's podFailurePolicy fails on it)
CONFIG_ERROR = 2  # a stage pod's exit 2 (bad config or data) ends its Job through the PodFailurePolicy rule
# kind -> (API group/version, plural) of what a manifest may hold; anything else is refused before it is sent
KINDS = {"Job": ("batch/v1", "jobs"), "Service": ("v1", "services"), "Deployment": ("apps/v1", "deployments"),
         "RayService": ("ray.io/v1", "rayservices")}


class LaunchError(ConfigError):
    """A stage's manifests are missing or malformed, or the API refused a request."""


@dataclass(frozen=True)
class Settings:
    namespace: str
    manifests: Path
    owner_configmap: str | None
    poll_seconds: float

    @classmethod
    def from_env(cls) -> Settings:
        ns = os.environ.get("K8S_NAMESPACE")
        if not ns:
            sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            ns = sa_ns.read_text().strip() if sa_ns.exists() else "default"
        return cls(namespace=ns, manifests=Path(os.environ.get("K8S_MANIFESTS", "/etc/colossal-rlhf/pipeline")),
                   owner_configmap=os.environ.get("K8S_OWNER_CONFIGMAP") or None,
                   poll_seconds=float(os.environ.get("K8S_POLL_SECONDS", "20")))


def _say(msg: str) -> None:
    print(f"[k8s] {msg}", flush=True)


def _quantities_as_strings(node: Any) -> Any:
    """Resource quantities as strings: the API takes ``nvidia.com/gpu: 1``, but the client's typed models (37.x)
    refuse a number where a Quantity string belongs."""
    if isinstance(node, list):
        return [_quantities_as_strings(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("limits", "requests") and isinstance(v, dict):
            v = {q: str(n) if isinstance(n, int | float) and not isinstance(n, bool) else n for q, n in v.items()}
        out[k] = _quantities_as_strings(v)
    return out


def manifest_checksum(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_manifests(settings: Settings, name: str) -> list[dict[str, Any]]:
    path = settings.manifests / f"{name}.yaml"
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    except FileNotFoundError as e:
        raise LaunchError(f"{name}: no manifests at {path} (is the stage enabled in the chart?)") from e
    except yaml.YAMLError as e:
        raise LaunchError(f"{path} is not valid YAML: {e}") from e
    for d in docs:
        if d.get("kind") not in KINDS or d.get("apiVersion") != KINDS[d["kind"]][0]:
            raise LaunchError(f"{path}: {d.get('apiVersion')}/{d.get('kind')} is not one of {sorted(KINDS)}")
        if not d.get("metadata", {}).get("name"):
            raise LaunchError(f"{path}: a {d['kind']} without metadata.name")
    return docs


class Cluster:
    """The few API calls the launcher makes, through the official client (imported here, not at module import)."""

    def __init__(self, settings: Settings):
        from kubernetes import client, config

        try:
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()
            else:  # (the client reads $KUBECONFIG once, at its import: pass it along explicitly)
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
        except config.ConfigException as e:
            raise LaunchError(f"no Kubernetes API to talk to: {e}") from None
        self.ns = settings.namespace
        self.settings = settings
        self.ApiException = client.ApiException
        self.core, self.batch, self.apps = client.CoreV1Api(), client.BatchV1Api(), client.AppsV1Api()
        self.custom = client.CustomObjectsApi()
        self._owner: list[dict[str, Any]] | None = None

    def owner_references(self) -> list[dict[str, Any]]:
        if self._owner is None:
            self._owner = []
            if self.settings.owner_configmap:
                cm = self.core.read_namespaced_config_map(self.settings.owner_configmap, self.ns)
                self._owner = [{"apiVersion": "v1", "kind": "ConfigMap", "name": cm.metadata.name,
                                "uid": cm.metadata.uid}]
        return self._owner

    def _call(self, kind: str, verb: str, name: str | None = None, body: dict | None = None) -> dict[str, Any] | None:
        """One request; returns the object as a dict, None for 404 on get/delete."""
        ns = self.ns
        try:
            if kind == "RayService":
                args = ("ray.io", "v1", ns, "rayservices")
                fn = {"get": lambda: self.custom.get_namespaced_custom_object(*args, name),
                      "create": lambda: self.custom.create_namespaced_custom_object(*args, body),
                      "patch": lambda: self.custom.patch_namespaced_custom_object(*args, name, body)}[verb]
                return fn()
            api, suffix = {"Job": (self.batch, "job"), "Service": (self.core, "service"),
                           "Deployment": (self.apps, "deployment")}[kind]
            if verb == "get":
                out = getattr(api, f"read_namespaced_{suffix}")(name, ns)
            elif verb == "create":
                out = getattr(api, f"create_namespaced_{suffix}")(ns, body)
            elif verb == "patch":
                out = getattr(api, f"patch_namespaced_{suffix}")(name, ns, body)
            else:
                out = getattr(api, f"delete_namespaced_{suffix}")(name, ns, propagation_policy="Background")
            return api.api_client.sanitize_for_serialization(out)
        except self.ApiException as e:
            if e.status == 404 and verb in ("get", "delete"):
                return None
            if e.status >= 500 or e.status == 429:  # the API server's trouble: the orchestrator pod is retried
                raise
            raise LaunchError(f"{verb} {kind} {name or (body or {}).get('metadata', {}).get('name')}: "
                              f"HTTP {e.status} {e.reason}: {(e.body or '')[:300]}") from None

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self._call(kind, "get", name)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        body = _quantities_as_strings(obj)
        meta = body.setdefault("metadata", {})
        meta["namespace"] = self.ns
        meta.setdefault("annotations", {})[CHECKSUM] = manifest_checksum(obj)
        if self.owner_references():
            meta["ownerReferences"] = self.owner_references()
        return self._call(obj["kind"], "create", body=body)  # type: ignore[return-value]

    def patch(self, obj: dict[str, Any]) -> dict[str, Any]:
        body = _quantities_as_strings(obj)
        body.setdefault("metadata", {}).setdefault("annotations", {})[CHECKSUM] = manifest_checksum(obj)
        return self._call(obj["kind"], "patch", obj["metadata"]["name"], body)  # type: ignore[return-value]

    def delete(self, kind: str, name: str) -> None:
        self._call(kind, "delete", name)


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """("complete" | "failed" | "running", detail) from a Job's status conditions."""
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "complete", cond.get("message") or "complete"
        if cond.get("type") == "Failed":
            return "failed", f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    return "running", f"active {status.get('active', 0)}, succeeded {status.get('succeeded', 0)}, " \
                      f"failed {status.get('failed', 0)}"


def _exit_code(job: dict[str, Any]) -> int:
    """A config error (the PodFailurePolicy rule on exit 2) stays 2; any other failure is STAGE_FAILED."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("reason") == "PodFailurePolicy":
            return CONFIG_ERROR
    return STAGE_FAILED


def ensure(cluster: Cluster, obj: dict[str, Any]) -> dict[str, Any]:
    """The live object for a Service or Job manifest: found, created, or (a finished Job whose manifest changed)
    deleted and created again."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    want = manifest_checksum(obj)
    live = cluster.get(kind, name)
    if live is not None:
        have = ((live.get("metadata") or {}).get("annotations") or {}).get(CHECKSUM)
        state, detail = job_state(live) if kind == "Job" else ("", "exists")
        if kind != "Job" or (have == want and state != "failed"):
            _say(f"{kind.lower()}/{name}: found ({detail})")
            return live
        if state == "running":
            _say(f"job/{name}: running from an older manifest; following it, then it is replaced")
            live = follow(cluster, name)
        # a Job that failed before this orchestrator started gets a fresh attempt: starting the orchestrator again
        # (after fixing the cause) is how a failed pipeline is resumed; its pods --resume from the last checkpoint
        why = "the chart changed it" if have != want else f"it had failed ({detail}); a new attempt"
        _say(f"job/{name}: {why}; replacing the finished Job")
        cluster.delete(kind, name)
        while cluster.get(kind, name) is not None:
            time.sleep(min(cluster.settings.poll_seconds, 2.0))
    _say(f"{kind.lower()}/{name}: creating")
    return cluster.create(obj)


def follow(cluster: Cluster, name: str) -> dict[str, Any]:
    """Poll a Job until it has completed or failed; returns its last state."""
    last = ""
    while True:
        job = cluster.get("Job", name)
        if job is None:
            raise LaunchError(f"job/{name} disappeared while it was followed (deleted by hand?)")
        state, detail = job_state(job)
        if detail != last:
            _say(f"job/{name}: {state} ({detail})")
            last = detail
        if state != "running":
            return job
        time.sleep(cluster.settings.poll_seconds)


def run_objects(cluster: Cluster, docs: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """Ensure each object in order, following every Job to its end; (exit code, Job names) of the run."""
    jobs: list[str] = []
    for obj in docs:
        live = ensure(cluster, obj)
        if obj["kind"] != "Job":
            continue
        name = obj["metadata"]["name"]
        jobs.append(name)
        if job_state(live)[0] == "running":
            live = follow(cluster, name)
        state, detail = job_state(live)
        if state == "failed":
            _say(f"job/{name} failed: {detail}; see `kubectl -n {cluster.ns} logs job/{name}`")
            return _exit_code(live), jobs
    return 0, jobs


def run_stage_job(p: StagePlan, cfg: PipelineConfig, cluster: Cluster | None = None) -> int:
    """training.pipeline's hook for ``launcher: kubernetes``: the stage's Jobs, created and followed."""
    started = time.time()
    try:
        cluster = cluster or Cluster(Settings.from_env())
        rc, jobs = run_objects(cluster, load_manifests(cluster.settings, p.spec.name))
    except LaunchError as e:  # missing manifests, a request the Role refuses: a new orchestrator pod cannot help
        print(f"error: {p.spec.name}: {e}", file=sys.stderr, flush=True)
        rc, jobs = CONFIG_ERROR, []
    p.result = {"status": "ran" if rc == 0 else "failed", "exit_code": rc, "restarts": 0,
                "seconds": round(time.time() - started, 1), "jobs": jobs}
    return rc


def apply(cluster: Cluster, name: str) -> int:
    """Create the workloads of ``name``.yaml, or patch them when the chart changed them (serving's rollout)."""
    for obj in load_manifests(cluster.settings, name):
        kind, obj_name = obj["kind"], obj["metadata"]["name"]
        live = cluster.get(kind, obj_name)
        if live is None:
            _say(f"{kind.lower()}/{obj_name}: creating")
            cluster.create(obj)
        elif ((live.get("metadata") or {}).get("annotations") or {}).get(CHECKSUM) != manifest_checksum(obj):
            _say(f"{kind.lower()}/{obj_name}: the chart changed it; patching")
            cluster.patch(obj)
        else:
            _say(f"{kind.lower()}/{obj_name}: up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply", help="create or update the objects of $K8S_MANIFESTS/NAME.yaml")
    a.add_argument("name")
    r = sub.add_parser("run", help="run the Jobs of $K8S_MANIFESTS/NAME.yaml in order, following each")
    r.add_argument("name")
    args = ap.parse_args(argv)
    try:
        cluster = Cluster(Settings.from_env())
        if args.cmd == "apply":
            return apply(cluster, args.name)
        return run_objects(cluster, load_manifests(cluster.settings, args.name))[0]
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
