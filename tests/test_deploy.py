"""deploy/: the Kubernetes manifest and the Dockerfiles have the fields a deployment relies on.

No Docker or Kubernetes on the build machine, so these are structural checks of the files."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def manifest() -> dict:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_kubernetes_deployment_and_service():
    objects = manifest()
    assert set(objects) == {"Deployment", "Service"}
    deployment, service = objects["Deployment"], objects["Service"]
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    spec = deployment["spec"]
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"] == service["spec"]["selector"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000} and service["spec"]["ports"][0]["targetPort"] == "http"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) <= set(container["resources"]["limits"])
    assert container["args"][:3] == ["r1tune", "serve", "/models/run.yaml"] and "--host" in container["args"]
    key = container["env"][0]
    assert key["name"] == "R1TUNE_API_KEY" and "secretKeyRef" in key["valueFrom"]
    mount = container["volumeMounts"][0]
    assert mount["mountPath"] == "/models" and mount["readOnly"] is True
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "r1tune-models"


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = (DEPLOY / name).read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfiles_run_the_server_as_a_non_root_user_with_a_health_check():
    for name, extras in (("Dockerfile.cpu", "[serve]"), ("Dockerfile.cuda", "[serve,qlora]")):
        steps = dockerfile(name)
        kinds = [k for k, _ in steps]
        assert kinds[0] == "FROM" and {"USER", "EXPOSE", "HEALTHCHECK", "CMD"} <= set(kinds), name
        args = dict(steps)
        assert args["USER"] != "root" and args["EXPOSE"] == "8000"
        assert "/health" in args["HEALTHCHECK"]
        assert args["CMD"].startswith('["r1tune", "serve", "/models/run.yaml", "--host", "0.0.0.0"')
        assert extras in " ".join(a for k, a in steps if k == "RUN"), name
        assert kinds.index("USER") < kinds.index("CMD")
    assert "download.pytorch.org/whl/cpu" in (DEPLOY / "Dockerfile.cpu").read_text()
