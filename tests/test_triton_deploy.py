"""``deploy/kubernetes/``: the Kubernetes example validated offline against the API schemas
(kubernetes-validate, strict: no unknown field), and consistent with what the repository writer
produces (the probe's path, the ports, the queue metric's model name)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs the triton extra (kubernetes-validate)")
yaml = pytest.importorskip("yaml", reason="kubernetes-validate brings PyYAML")

from blipdiffusion_trt.serving.triton import repository as tr  # noqa: E402

from helpers import run_cli  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
# the oldest Kubernetes still maintained when this was written, and the newest the schemas know
VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version())


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(path, version):
    docs = documents(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_broken_manifest_is_refused():
    """The check can fail: a typo'd field and a wrong type are errors."""
    (deployment, *_), = [documents(p) for p in MANIFESTS if p.name == "blip-diffusion.yaml"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["periodSecond"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    del container["livenessProbe"]["periodSecond"]
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_example_matches_the_repository_it_serves(tiny, tmp_path):
    """The liveness probe runs the file the writer copies into the repository (and that file runs on
    its own: a dead port is one line, exit 1); the ports are the Service's; the queue HPA's rule
    names the pipeline model."""
    docs = {d["kind"]: d for p in MANIFESTS for d in documents(p) if d["kind"] != "HorizontalPodAutoscaler"}
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "models")
    assert f"--model-repository={mount}" in container["args"]
    probe_command = container["livenessProbe"]["exec"]["command"]
    probe_file = Path(probe_command[1])
    assert probe_file == Path(mount) / tr.BLS_MODEL / tr.PROBE_COPY
    repo = tr.write_triton_repository(tiny.package, tmp_path / "repo", "python-cpu").path
    copy = repo / probe_file.relative_to(mount)
    assert copy.read_bytes() == tr.PROBE_FILE.read_bytes()
    import subprocess

    result = subprocess.run([sys.executable, "-S", str(copy), "--url=127.0.0.1:9", "--timeout=5"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("unhealthy: no answer from"), result
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["name"]: p["port"] for p in docs["Service"]["spec"]["ports"]} == ports
    assert f"--http-port={ports['http']}" in container["args"] and f"--url=127.0.0.1:{ports['http']}" in probe_command
    assert 'model="blip_diffusion"' in (DEPLOY / "hpa-queue.yaml").read_text()
    assert run_cli("triton-probe", "--help").returncode == 0
