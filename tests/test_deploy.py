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


def test_multinode_training_job_launches_one_r1tune_per_node():
    """The Indexed Job's pods are the nodes: NODE_RANK is the completion index, NNODES the completions, and
    MASTER_ADDR names pod 0 through the headless Service; the variables are the ones r1tune.launch reads."""
    from r1tune.launch import plan_from_env

    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes-train-multinode.yaml").read_text()) if d}
    job, service = docs["Job"], docs["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert int(env["NNODES"]) == spec["completions"]
    assert "job-completion-index" in env["NODE_RANK"]["fieldRef"]["fieldPath"]
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(env["MASTER_PORT"]) == service["spec"]["ports"][0]["port"]
    assert int(env["NPROC_PER_NODE"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["args"][:2] == ["r1tune", "train"] and pod["securityContext"]["runAsNonRoot"] is True
    plan = plan_from_env({**{k: v for k, v in env.items() if isinstance(v, str)}, "NODE_RANK": "1"}, gpus=8)
    assert (plan.nnodes, plan.node_rank, plan.nproc_per_node, plan.master_port) == (2, 1, 8, 29500)
