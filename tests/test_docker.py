"""The deployment files, checked without a Docker engine: lint, structure, and commands that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from faceforge.cli import build_parser

from conftest import REPO

DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile*"))


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def faceforge_commands(service: dict) -> list[str]:
    """The argv a service runs through the image's `faceforge` entry point, or [] if it runs something else."""
    if "entrypoint" in service:
        return []
    command = service["command"]
    return [arg for arg in command if not arg.startswith("${")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_its_base_and_runs_as_non_root(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert bases and all(":" in base and not base.endswith(":latest") for base in bases)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert "-c .ci/constraints.txt" in text or "-c /tmp/constraints-cuda.txt" in text
    for copied in re.findall(r"^COPY\s+(\S+)\s", text, re.MULTILINE):
        assert (REPO / copied).exists(), f"{dockerfile.name} copies {copied}, which is not in the repository"


def test_the_images_share_their_base_and_own_the_volumes_they_write() -> None:
    """Ray joins a worker to a head only on the same Python, and runs a job by the scheduler's interpreter path;
    a new named volume takes the owner of the image's folder it is mounted on."""
    texts = [dockerfile.read_text() for dockerfile in DOCKERFILES]
    assert len({re.search(r"^FROM\s+(\S+)", text, re.MULTILINE)[1] for text in texts}) == 1
    mounted = {volume.split(":")[1] for volume in compose()["services"]["autolabel"]["volumes"]}
    for dockerfile, text in zip(DOCKERFILES, texts, strict=True):
        written = mounted - {"/datasets"}  # read-only
        assert all(re.search(rf"chown faceforge:faceforge .*{path}\b", text) for path in written), dockerfile.name
    assert re.search(r"^torch==[\d.]+$", (REPO / ".ci" / "constraints.txt").read_text(), re.MULTILINE), (
        "a local version (+cpu) is on no index but PyTorch's own; the Makefile installs from PyPI"
    )


def test_deploy_guide_starts_ray_past_the_faceforge_entry_point() -> None:
    commands = re.findall(r"docker run ((?:[^\n]*\\\n)*[^\n]*)", (REPO / "docs" / "deploy.md").read_text())
    ray = [command for command in commands if " ray start" in command]
    assert ray and all("--entrypoint" in command for command in ray), ray


def test_compose_has_the_platform_services_with_healthchecks_and_volumes() -> None:
    spec = compose()
    services = spec["services"]
    assert {"mlflow", "scheduler", "web", "autolabel", "ray-head", "ray-worker"} <= set(services)
    assert {"data", "datasets", "inbox"} <= set(spec["volumes"])
    anchor = services["web"]
    for name, service in services.items():
        assert "healthcheck" in service and service["healthcheck"]["test"][0] == "CMD", name
        assert service["user"].split(":")[0] not in ("0", "root"), name
        assert any(volume.startswith("data:/data") for volume in service["volumes"]), name
        assert service["image"] == anchor["image"], name
    assert services["ray-head"]["profiles"] == ["ray"] and services["ray-worker"]["profiles"] == ["ray"]
    for port in (p for service in services.values() for p in service.get("ports", [])):
        assert port.startswith("127.0.0.1:"), f"{port} would listen on every interface of the host"


@pytest.mark.parametrize("service", ["scheduler", "web", "autolabel"])
def test_compose_runs_faceforge_commands_that_exist(service: str) -> None:
    argv = faceforge_commands(compose()["services"][service])
    assert argv, f"{service} does not run faceforge"
    build_parser().parse_args(argv)  # an unknown command or flag exits with status 2


def test_compose_healthcheck_commands_exist() -> None:
    for name, service in compose()["services"].items():
        test = service["healthcheck"]["test"]
        if test[1] == "faceforge":
            build_parser().parse_args(test[2:])
        else:
            assert test[1] in ("curl", "ray"), name
