"""Generate the plain Kubernetes manifests under k8s/ from the Helm chart (for clusters without Helm).

    python k8s/generate.py          # rewrite k8s/base, k8s/components/*, k8s/overlays/*
    python k8s/generate.py --check  # exit 1 if the committed files differ from a fresh render

Rendering uses Helm's own engine (helm_python). The base is the chart with serving only; each component is
what turning one feature on adds to it (the objects it shares with the base must be identical, or this
fails). Overlays combine them: `pipeline` = the chart's defaults, `production` adds monitoring.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "colossal-rlhf"
OUT = ROOT / "k8s"
RELEASE = "colossal-rlhf"
NAMESPACE = "colossal-rlhf"
HEADER = "# Generated from helm/colossal-rlhf by `make k8s` (k8s/generate.py). Do not edit: change the chart.\n"

BASE_VALUES: dict[str, Any] = {"training": {"enabled": False}, "tests": {"enabled": False}}
COMPONENTS: dict[str, dict[str, Any]] = {
    "training": {"training": {"enabled": True}},
    "monitoring": {"monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                                  "grafanaDashboard": {"enabled": True}}},
}
OVERLAYS: dict[str, list[str]] = {"pipeline": ["training"], "production": ["training", "monitoring"]}


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render(values: dict[str, Any], *, name: str = RELEASE, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """The chart's objects for ``values`` (NOTES.txt left out), in template order."""
    import helm_python

    with helm_python.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name=name, namespace=namespace)
    objs = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        objs.extend(o for o in yaml.safe_load_all(rendered[path]) if o)
    return objs


def _plain(obj: dict[str, Any]) -> dict[str, Any]:
    """Drop what only Helm uses: chart label, managed-by Helm, resource policy."""
    meta = obj.get("metadata", {})
    labels = meta.get("labels", {})
    labels.pop("helm.sh/chart", None)
    if labels.get("app.kubernetes.io/managed-by") == "Helm":
        labels["app.kubernetes.io/managed-by"] = "kustomize"
    ann = meta.get("annotations") or {}
    ann.pop("helm.sh/resource-policy", None)
    if not ann:
        meta.pop("annotations", None)
    return obj


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _filename(obj: dict[str, Any]) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def _dump(obj: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(obj, sort_keys=False, width=120)


def _kustomization(kind: str, resources: list[str], components: list[str] | None = None,
                   namespace: str | None = None, deletes: list[dict[str, Any]] | None = None) -> str:
    doc: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1" if kind == "Kustomization"
                           else "kustomize.config.k8s.io/v1alpha1", "kind": kind}
    if namespace:
        doc["namespace"] = namespace
    doc["resources"] = resources
    if components:
        doc["components"] = components
    if deletes:
        doc["patches"] = [{"patch": yaml.safe_dump({"$patch": "delete", "apiVersion": o["apiVersion"],
                                                    "kind": o["kind"], "metadata": {"name": o["metadata"]["name"]}},
                                                   sort_keys=False)} for o in deletes]
    return HEADER + yaml.safe_dump(doc, sort_keys=False)


def build() -> dict[str, str]:
    """Every file under k8s/ (relative path -> text) that a fresh render gives."""
    files: dict[str, str] = {}
    base = {_key(o): _plain(o) for o in render(BASE_VALUES)}
    for obj in base.values():
        files[f"base/{_filename(obj)}"] = _dump(obj)
    files["base/kustomization.yaml"] = _kustomization(
        "Kustomization", [_filename(o) for o in base.values()], namespace=NAMESPACE)
    for comp, extra in COMPONENTS.items():
        added, seen = [], set()
        for obj in map(_plain, render(_merge(BASE_VALUES, extra))):
            seen.add(_key(obj))
            if _key(obj) in base:
                if obj != base[_key(obj)]:
                    raise SystemExit(f"component {comp} changes {_key(obj)} of the base; make it additive")
                continue
            added.append(obj)
            files[f"components/{comp}/{_filename(obj)}"] = _dump(obj)
        # what the component takes over (training: the orchestrator creates serving once the model exists)
        dropped = [base[k] for k in base if k not in seen]
        files[f"components/{comp}/kustomization.yaml"] = _kustomization(
            "Component", [_filename(o) for o in added], deletes=dropped)
    for overlay, comps in OVERLAYS.items():
        files[f"overlays/{overlay}/kustomization.yaml"] = _kustomization(
            "Kustomization", ["../../base"], [f"../../components/{c}" for c in comps], namespace=NAMESPACE)
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    a = p.parse_args(argv)
    files = build()
    existing = {str(f.relative_to(OUT)): f.read_text() for f in OUT.rglob("*.yaml")}
    if a.check:
        diff = []
        for rel in sorted(set(files) | set(existing)):
            if files.get(rel) != existing.get(rel):
                old, new = (existing.get(rel) or "").splitlines(), (files.get(rel) or "").splitlines()
                diff.extend(difflib.unified_diff(old, new, f"k8s/{rel} (committed)", f"k8s/{rel} (rendered)",
                                                 lineterm=""))
        if diff:
            print("\n".join(diff[:200]))
            print("k8s/ is out of date with helm/colossal-rlhf: run `make k8s`", file=sys.stderr)
            return 1
        print(f"k8s/ in sync ({len(files)} files)")
        return 0
    for rel in set(existing) - set(files):
        (OUT / rel).unlink()
    for rel, text in files.items():
        path = OUT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(files)} files under k8s/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
