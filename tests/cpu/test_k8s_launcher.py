"""The Kubernetes launcher (training/launchers/kubernetes.py) driving the chart's real manifests.

No API server can run here: a stdlib HTTP server stands in for it (``FakeApiServer``). It speaks the REST paths
the official ``kubernetes`` client uses, stores what is created, replays Job statuses in the API's shape
(tests/cpu/data/k8s/job-statuses.json) and enforces the chart's rendered Role, answering 403 to any request the
Role does not grant. The client, the pipeline (``training.pipeline.main``) and the manifests are the real ones.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("kubernetes")
pytest.importorskip("helm_python")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "k8s"))
import generate  # noqa: E402

from training.launchers import kubernetes as k8s  # noqa: E402

STATUSES = json.loads((ROOT / "tests" / "cpu" / "data" / "k8s" / "job-statuses.json").read_text())
NS = "llm"
CHART_CI = ROOT / "helm" / "colossal-rlhf" / "ci"


def ci_values(case: str) -> dict:
    return yaml.safe_load((CHART_CI / f"{case}-values.yaml").read_text()) or {}


class FakeApiServer:
    """Stands in for the Kubernetes API server: objects by (plural, name), RBAC from a Role, scripted Job status."""

    def __init__(self, role: dict[str, Any]):
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.scripts: dict[str, list[str]] = {}  # job name -> statuses replayed one per GET (the last one stays)
        self.on_create: dict[str, list[str]] = {}  # the script a Job of that name gets when it is created
        self.log: list[tuple[str, str, str]] = []  # (verb, resource, name) of every allowed request
        self.denied: list[tuple[str, str, str]] = []
        self.rules = role["rules"]
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                code, out = server.handle(method, self.path.split("?")[0], body)
                self._reply(code, out)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_PATCH(self) -> None:  # noqa: N802
                self._handle("PATCH")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def allowed(self, group: str, resource: str, verb: str, name: str) -> bool:
        for r in self.rules:
            if group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]:
                if not r.get("resourceNames") or name in r["resourceNames"]:
                    return True
        return False

    @staticmethod
    def _status(code: int, reason: str, msg: str) -> tuple[int, dict]:
        return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": msg, "reason": reason,
                      "code": code}

    def put(self, obj: dict[str, Any], status: str | None = None) -> None:
        """An object that exists before the orchestrator starts (as the API server returns it: quantities as
        strings); a Job keeps ``status`` unless a script is set for it."""
        obj = k8s._quantities_as_strings(obj)
        obj.setdefault("metadata", {}).update(namespace=NS, uid=str(uuid.uuid4()))
        if status:
            obj["status"] = STATUSES[status]
            self.scripts[obj["metadata"]["name"]] = [status]
        plural = {**{k: v[1] for k, v in k8s.KINDS.items()}, "ConfigMap": "configmaps"}[obj["kind"]]
        self.objects[(plural, obj["metadata"]["name"])] = obj

    def running_jobs(self) -> list[str]:
        return [n for (res, n), o in self.objects.items() if res == "jobs" and k8s.job_state(o)[0] == "running"]

    def handle(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        parts = path.strip("/").split("/")
        group = "" if parts[0] == "api" else parts[1]
        rest = parts[2:] if parts[0] == "api" else parts[3:]
        assert rest[0] == "namespaces" and rest[1] == NS, path
        resource, name = rest[2], (rest[3] if len(rest) > 3 else (body or {}).get("metadata", {}).get("name", ""))
        verb = {"GET": "get", "POST": "create", "PATCH": "patch", "DELETE": "delete"}[method]
        if not self.allowed(group, resource, verb, name):
            self.denied.append((verb, resource, name))
            return self._status(403, "Forbidden", f'{resource} "{name}" is forbidden: cannot {verb}')
        self.log.append((verb, resource, name))
        key = (resource, name)
        if verb == "create":
            if key in self.objects:
                return self._status(409, "AlreadyExists", f'{resource} "{name}" already exists')
            if resource == "jobs":
                assert not self.running_jobs(), f"{name} created while {self.running_jobs()} still runs"
            obj = json.loads(json.dumps(body))
            obj["metadata"]["uid"] = str(uuid.uuid4())
            self.objects[key] = obj
            if resource == "jobs":
                self.scripts[name] = self.on_create.pop(name, ["pending", "running", "complete"])
            return 201, obj
        if key not in self.objects:
            return self._status(404, "NotFound", f'{resource} "{name}" not found')
        obj = self.objects[key]
        if verb == "delete":
            del self.objects[key]
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        if verb == "patch":
            obj = generate._merge(obj, body or {})
            self.objects[key] = obj
            return 200, obj
        if resource == "jobs":
            script = self.scripts[name]
            obj["status"] = STATUSES[script.pop(0) if len(script) > 1 else script[0]]
        return 200, obj

    def close(self) -> None:
        self.httpd.shutdown()


class Release:
    """The chart rendered for some values, its orchestrator's files on disk, and a fake API server with its Role."""

    def __init__(self, values: dict, tmp: Path, monkeypatch: pytest.MonkeyPatch):
        self.objs = generate.render(values, name="demo", namespace=NS)
        by = {(o["kind"], o["metadata"]["name"]): o for o in self.objs}
        (self.role,) = [o for o in self.objs if o["kind"] == "Role"]
        (self.cm,) = [o for o in self.objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-pipeline")]
        (self.job,) = [o for o in self.objs if o["kind"] == "Job"
                       and o["metadata"]["labels"]["app.kubernetes.io/component"] == "orchestrator"]
        manifests, training = tmp / "pipeline", tmp / "training"
        manifests.mkdir(parents=True)
        training.mkdir(parents=True)
        for key, text in self.cm["data"].items():
            if key == "pipeline.yaml":
                text = text.replace("/etc/colossal-rlhf/training/", f"{training}/")
            (manifests / key).write_text(text)
        training_cm = by[("ConfigMap", self.cm["metadata"]["name"].removesuffix("-pipeline") + "-training")]
        for key, text in training_cm["data"].items():
            (training / key).write_text(text)
        self.pipeline_yaml = manifests / "pipeline.yaml"
        self.run_dir = tmp / "run"
        self.api = FakeApiServer(self.role)
        self.api.put(self.cm)
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.api.url}}],
            "users": [{"name": "orchestrator", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "orchestrator", "namespace": NS}}]}))
        env = {e["name"]: e.get("value") for e in self.job["spec"]["template"]["spec"]["containers"][0]["env"]}
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("K8S_NAMESPACE", NS)
        monkeypatch.setenv("K8S_MANIFESTS", str(manifests))
        monkeypatch.setenv("K8S_OWNER_CONFIGMAP", env["K8S_OWNER_CONFIGMAP"])
        monkeypatch.setenv("K8S_POLL_SECONDS", "0.01")

    def manifests(self, stage: str) -> list[dict]:
        return [d for d in yaml.safe_load_all(self.cm["data"][f"{stage}.yaml"]) if d]

    def run_pipeline(self) -> int:
        from training.pipeline import main

        return main(["--config", str(self.pipeline_yaml), f"run_dir={self.run_dir}"])

    def run_script(self) -> None:
        """Every line of the orchestrator's script, as its pod runs them (each must exit 0)."""
        for argv in self.orchestrator_script():
            if argv[:3] == ["python", "-m", "training.pipeline"]:
                assert self.run_pipeline() == 0
            else:
                assert argv[:3] == ["python", "-m", "training.launchers.kubernetes"], argv
                assert k8s.main(argv[3:]) == 0, argv

    def created(self, resource: str | None = None) -> list[str]:
        return [n for v, r, n in self.api.log if v == "create" and (resource is None or r == resource)]

    def orchestrator_script(self) -> list[list[str]]:
        script = self.job["spec"]["template"]["spec"]["containers"][0]["args"][0]
        return [line.split() for line in script.strip().splitlines()]


@pytest.fixture
def release(tmp_path, monkeypatch):
    made: list[Release] = []

    def make(values: dict) -> Release:
        r = Release(values, tmp_path / f"r{len(made)}", monkeypatch)
        made.append(r)
        return r

    yield make
    for r in made:
        r.api.close()


def _strip(obj: dict) -> dict:
    obj = k8s._quantities_as_strings(obj)
    meta = obj["metadata"]
    for k in ("uid", "ownerReferences"):
        meta.pop(k, None)
    meta.get("annotations", {}).pop(k8s.CHECKSUM, None)
    if not meta.get("annotations"):
        meta.pop("annotations", None)
    obj.pop("status", None)
    return obj


def test_fake_api_server_sees_stages_created_one_after_another_then_serving(release) -> None:
    r = release({})
    assert r.orchestrator_script() == [
        ["python", "-m", "training.pipeline", "--config", "/etc/colossal-rlhf/pipeline/pipeline.yaml"],
        ["python", "-m", "training.launchers.kubernetes", "apply", "serving"]]
    assert r.run_pipeline() == 0
    # the FakeApiServer refused any Job created while another still ran (assert in its handler)
    assert r.created() == [f"demo-colossal-rlhf-{s}" for s in ("fetch", "sft", "rm", "ppo", "quantize")]
    assert not r.api.denied
    cm_uid = r.api.objects[("configmaps", "demo-colossal-rlhf-pipeline")]["metadata"]["uid"]
    for stage in ("sft", "rm", "ppo", "quantize"):
        for doc in r.manifests(stage):
            live = r.api.objects[("jobs", doc["metadata"]["name"])]
            # the Job is the chart's manifest, plus owner and checksum
            assert _strip(live) == k8s._quantities_as_strings(doc)
            assert live["metadata"]["ownerReferences"] == [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "demo-colossal-rlhf-pipeline", "uid": cm_uid}]
            assert live["metadata"]["annotations"][k8s.CHECKSUM] == k8s.manifest_checksum(doc)
    record = json.loads((r.run_dir / "pipeline.json").read_text())
    assert [(s["stage"], s["status"], s["jobs"][-1]) for s in record["stages"]] == [
        (s, "ran", f"demo-colossal-rlhf-{s}") for s in ("sft", "rm", "ppo", "quantize")]
    assert ("deployments", "demo-colossal-rlhf-serving") not in r.api.objects, "no serving before the model"
    assert k8s.main(["apply", "serving"]) == 0
    dep = r.api.objects[("deployments", "demo-colossal-rlhf-serving")]
    assert _strip(dep) == k8s._quantities_as_strings(r.manifests("serving")[0])
    assert k8s.main(["apply", "serving"]) == 0
    assert [v for v, res, _ in r.api.log if res == "deployments"] == ["get", "create", "get"], "unchanged: no patch"


def test_fake_api_server_restarted_orchestrator_follows_existing_jobs_and_creates_only_the_rest(release) -> None:
    r = release({})
    for stage in ("fetch", "sft"):
        doc = r.manifests("sft")[0 if stage == "fetch" else 1]
        r.api.put({**doc, "metadata": {**doc["metadata"], "annotations": {k8s.CHECKSUM: k8s.manifest_checksum(doc)}}},
                  "complete")
    rm = r.manifests("rm")[0]
    r.api.put({**rm, "metadata": {**rm["metadata"], "annotations": {k8s.CHECKSUM: k8s.manifest_checksum(rm)}}},
              "running")
    r.api.scripts["demo-colossal-rlhf-rm"] = ["retrying", "running", "complete"]
    assert r.run_pipeline() == 0
    assert r.created() == ["demo-colossal-rlhf-ppo", "demo-colossal-rlhf-quantize"]
    rm_gets = [n for v, res, n in r.api.log if v == "get" and n == "demo-colossal-rlhf-rm"]
    assert len(rm_gets) >= 3, "the running rm Job was followed to its end"


def test_fake_api_server_orchestrator_started_again_gives_a_failed_stage_a_new_attempt(release) -> None:
    r = release({})
    r.api.on_create["demo-colossal-rlhf-rm"] = ["running", "failed-backoff"]
    assert r.run_pipeline() == k8s.STAGE_FAILED
    # the cause fixed (e.g. a full disk), the orchestrator started again: the failed Job stays failed in the API
    assert r.run_pipeline() == 0
    rm_calls = [v for v, _, n in r.api.log if n == "demo-colossal-rlhf-rm"]
    assert rm_calls.count("create") == 2 and rm_calls.count("delete") == 1
    assert r.created().count("demo-colossal-rlhf-sft") == 1, "the complete stages are not run again"


def test_fake_api_server_changed_manifest_replaces_a_finished_job(release) -> None:
    r = release({})
    old = r.manifests("sft")[1]
    r.api.put({**old, "metadata": {**old["metadata"], "annotations": {k8s.CHECKSUM: "an-older-chart"}}}, "complete")
    assert r.run_pipeline() == 0
    sft_calls = [v for v, _, n in r.api.log if n == "demo-colossal-rlhf-sft"]
    assert sft_calls[:3] == ["get", "delete", "get"] and "create" in sft_calls


@pytest.mark.parametrize("status, rc", [("failed-config", k8s.CONFIG_ERROR), ("failed-backoff", k8s.STAGE_FAILED)])
def test_fake_api_server_failed_stage_stops_the_pipeline_with_its_exit_code(release, status, rc) -> None:
    r = release({})
    r.api.on_create["demo-colossal-rlhf-ppo"] = ["running", status]
    assert r.run_pipeline() == rc
    assert r.created()[-1] == "demo-colossal-rlhf-ppo" and "demo-colossal-rlhf-quantize" not in r.created()
    rules = r.job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rc in rules[0]["onExitCodes"]["values"], "not retried in vain"


def test_fake_api_server_load_test_runs_after_serving_is_applied(release) -> None:
    r = release(ci_values("production"))
    assert r.orchestrator_script()[1:] == [["python", "-m", "training.launchers.kubernetes", "apply", "serving"],
                                           ["python", "-m", "training.launchers.kubernetes", "run", "loadtest"]]
    r.run_script()
    assert r.created()[-1] == "llm-loadtest" and ("deployments", "llm-serving") in r.api.objects
    assert [n for v, res, n in r.api.log if v == "create"].index("llm-serving") < r.created().index("llm-loadtest")


def test_fake_api_server_multi_node_stage_gets_its_service_before_its_indexed_job(release) -> None:
    r = release(ci_values("multinode"))
    assert r.run_pipeline() == 0
    assert r.created("services") == ["demo-colossal-rlhf-sft", "demo-colossal-rlhf-ppo"]
    order = r.created()
    assert order.index("demo-colossal-rlhf-sft") == order.index("demo-colossal-rlhf-fetch") + 1
    sft = r.api.objects[("jobs", "demo-colossal-rlhf-sft")]
    assert sft["spec"]["completionMode"] == "Indexed" and sft["spec"]["completions"] == 2
    assert [o for o in r.orchestrator_script() if "apply" in o] == [], "serving disabled: nothing to apply"


def test_fake_api_server_rayservice_is_created_then_patched_when_the_chart_changes(release, tmp_path) -> None:
    r = release(ci_values("rayservice"))
    assert r.run_pipeline() == 0 and k8s.main(["apply", "serving"]) == 0
    rs = r.api.objects[("rayservices", "demo-colossal-rlhf")]
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    changed = r.manifests("serving")[0]
    changed["spec"]["rayClusterConfig"]["rayVersion"] = "2.61.0"
    (Path(k8s.Settings.from_env().manifests) / "serving.yaml").write_text(yaml.safe_dump(changed))
    assert k8s.main(["apply", "serving"]) == 0
    assert r.api.objects[("rayservices", "demo-colossal-rlhf")]["spec"]["rayClusterConfig"]["rayVersion"] == "2.61.0"
    assert ("patch", "rayservices", "demo-colossal-rlhf") in r.api.log


PIPELINE_CASES = [p.name.removesuffix("-values.yaml") for p in sorted(CHART_CI.glob("*-values.yaml"))
                  if (yaml.safe_load(p.read_text()) or {}).get("training", {}).get("enabled", True)]


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_fake_api_server_role_grants_exactly_what_the_orchestrator_uses(release, case) -> None:
    """Every request is allowed by the rendered Role (else 403), and every (resource, verb) granted is used."""
    r = release(ci_values(case))
    # a restart that meets a changed Job uses delete too
    sft = r.manifests("sft")[-1]
    r.api.put({**sft, "metadata": {**sft["metadata"], "annotations": {k8s.CHECKSUM: "old"}}}, "complete")
    r.run_script()
    if "serving.yaml" in r.cm["data"]:  # and an upgrade that changes serving patches it
        serving = r.manifests("serving")[0]
        serving["metadata"].setdefault("labels", {})["changed"] = "yes"
        (Path(k8s.Settings.from_env().manifests) / "serving.yaml").write_text(yaml.safe_dump(serving))
        assert k8s.main(["apply", "serving"]) == 0
    assert not r.api.denied
    used = {(res, v) for v, res, _ in r.api.log}
    granted = {(res, v) for rule in r.role["rules"] for res in rule["resources"] for v in rule["verbs"]}
    assert used == granted
    cm_rule = next(rule for rule in r.role["rules"] if rule["resources"] == ["configmaps"])
    assert cm_rule["resourceNames"] == [r.cm["metadata"]["name"]] and cm_rule["verbs"] == ["get"]
    binding = next(o for o in r.objs if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == r.role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == r.job["spec"]["template"]["spec"]["serviceAccountName"]
    assert not [o for o in r.objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_fake_api_server_refusing_a_request_fails_the_pipeline_as_a_config_error(release, capsys) -> None:
    r = release({})
    r.api.rules = [rule for rule in r.api.rules if rule["resources"] != ["jobs"] or "create" not in rule["verbs"]]
    assert r.run_pipeline() == k8s.CONFIG_ERROR
    assert r.api.denied and "HTTP 403" in capsys.readouterr().err


def test_missing_stage_manifests_are_a_clear_error(tmp_path) -> None:
    settings = k8s.Settings(namespace=NS, manifests=tmp_path, owner_configmap=None, poll_seconds=0.01)
    with pytest.raises(k8s.LaunchError, match="no manifests at .*/sft.yaml"):
        k8s.load_manifests(settings, "sft")
    (tmp_path / "sft.yaml").write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: x}\n")
    with pytest.raises(k8s.LaunchError, match="v1/Secret is not one of"):
        k8s.load_manifests(settings, "sft")
