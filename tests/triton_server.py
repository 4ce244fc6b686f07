"""A real ``tritonserver`` for the tests: the one nvidia-pytriton bundles, on 127.0.0.1 only.

:func:`start_server` runs it over model repositories (HTTP, gRPC and metrics ports picked free,
its own prefix for the python backend's shared-memory regions, its own session so that exactly
its processes can be stopped); :func:`stop_server` stops it (SIGTERM, then SIGKILL to its process
group) and removes the regions it left. Tests skip, saying why, where the bundled server cannot
run (glibc, numpy 2 without the overlay of ``BLIPDIFFUSION_TRT_STUB_NUMPY``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

STARTUP_SECONDS = 180


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _glibc() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else None


def _stub_python_bin(tmp: Path) -> Path:
    """bin/ directory of the Python the stub runs: this environment, with numpy<2 in front if needed."""
    if int(np.__version__.split(".")[0]) < 2:
        return Path(sys.executable).parent
    numpy1 = os.environ.get("BLIPDIFFUSION_TRT_STUB_NUMPY")
    if not numpy1:
        pytest.skip(
            f"pytriton's python backend stub is built against numpy 1.x (pytriton requires numpy<2), this "
            f"environment has numpy {np.__version__}: install the triton extra, or set BLIPDIFFUSION_TRT_STUB_NUMPY "
            f"to a directory made with `pip install --target DIR 'numpy<2'`"
        )
    overlay = tmp / "stub-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(overlay)], check=True)
    site_dir = Path(subprocess.run(
        [str(overlay / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    for entry in Path(numpy1).iterdir():
        if entry.name.startswith("numpy"):
            (site_dir / entry.name).symlink_to(entry)
    import site

    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages())
    (site_dir / "zz_blipdiffusion_trt_base.pth").write_text(lines)
    check = subprocess.run([str(overlay / "bin" / "python"), "-c", "import numpy, onnxruntime, tokenizers; print(numpy.__version__)"],
                           capture_output=True, text=True)
    if check.returncode or not check.stdout.startswith("1."):
        pytest.skip(f"BLIPDIFFUSION_TRT_STUB_NUMPY={numpy1}: no usable numpy<2 there ({check.stdout.strip() or check.stderr.strip()[-200:]})")
    return overlay / "bin"


class TritonServer:
    def __init__(self, process: subprocess.Popen, http_port: int, grpc_port: int, log: Path, metrics_port: int = 0):
        self.process = process
        self.shm_prefix = ""
        self.http_url = f"127.0.0.1:{http_port}"
        self.grpc_url = f"127.0.0.1:{grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log = log
        self._clients = []

    def client(self, protocol: str):
        if protocol == "http":
            import tritonclient.http as module

            client = module.InferenceServerClient(self.http_url, network_timeout=120.0, connection_timeout=30.0)
        else:
            import tritonclient.grpc as module

            client = module.InferenceServerClient(self.grpc_url)
        self._clients.append(client)
        return client

    def close_clients(self) -> None:
        while self._clients:
            self._clients.pop().close()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


SHM_DIR = Path("/dev/shm")
STOP_SECONDS = 20  # how long a SIGTERM'd server may take to stop before the test gives up on it


def start_server(repos: list[Path], tmp: Path) -> TritonServer:
    """tritonserver on 127.0.0.1 serving ``repos``, with its own prefix for the python backend's
    shared-memory regions (so that exactly its regions can be checked and removed)."""
    pytriton = pytest.importorskip("pytriton", reason="needs nvidia-pytriton (it bundles tritonserver)")
    glibc = _glibc()
    if glibc is None or glibc < (2, 35):
        pytest.skip(f"pytriton's tritonserver needs glibc >= 2.35, this system has {glibc}")
    dist = Path(pytriton.__file__).parent / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    python_backend = dist / "backends" / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    libs = dist.parent.parent / "nvidia_pytriton.libs"
    for needed in (binary, python_backend / "libtriton_python.so", stub):
        if not needed.is_file():
            pytest.skip(f"pytriton's server is incomplete here: {needed} is missing")

    backends = tmp / "backends"
    shutil.copytree(python_backend, backends / "python", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    python_bin = _stub_python_bin(tmp)
    env = dict(os.environ)
    env["PATH"] = f"{python_bin}{os.pathsep}{env.get('PATH', '')}"
    ld = [sysconfig.get_config_var("LIBDIR") or "", str(libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
    http_port, grpc_port, metrics_port = _free_ports(3)
    shm_prefix = f"blipdiffusion_trt_test_{os.getpid()}_{http_port}_"
    command = [str(binary)]
    for repo in repos:
        command += ["--model-repository", str(repo)]
    command += [
        "--backend-directory", str(backends), "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--allow-metrics", "true", "--allow-gpu-metrics", "false", "--metrics-address", "127.0.0.1", "--exit-timeout-secs", "10",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ]
    log = tmp / "tritonserver.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp,
                                   start_new_session=True)
    server = TritonServer(process, http_port, grpc_port, log, metrics_port)
    server.shm_prefix = shm_prefix
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"tritonserver exited with {process.returncode}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver not ready after {STARTUP_SECONDS} s:\n{server.log_tail()}")
            time.sleep(0.5)
    except BaseException:
        stop_server(server)
        raise
    return server


def shm_regions(server: TritonServer) -> list[Path]:
    return sorted(SHM_DIR.glob(server.shm_prefix + "*")) if SHM_DIR.is_dir() else []


def stop_server(server: TritonServer) -> dict:
    """SIGTERM; after :data:`STOP_SECONDS` SIGKILL to its process group (the server and its stubs,
    nothing else). Then its shared-memory regions are removed (a stub killed with SIGKILL cannot
    remove its own). Returns what happened: seconds to stop, killed or not, regions left."""
    server.close_clients()
    process = server.process
    result = {"seconds": 0.0, "killed": False, "regions_left": []}
    if process.poll() is None:
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            result["killed"] = True
            os.killpg(process.pid, signal.SIGKILL)  # its own session: the server and its stubs only
            process.wait(timeout=10)
        result["seconds"] = time.monotonic() - start
    try:  # stubs in the server's session that outlived it
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    result["regions_left"] = [p.name for p in shm_regions(server)]
    for region in shm_regions(server):
        region.unlink(missing_ok=True)
    return result


def stub_pid(server: TritonServer, model: str) -> int:
    """The python-backend stub process serving ``model`` (a child of the server; its command line
    names the model's file)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server.process.pid and any(f"/{model}/1/model.py".encode() in part for part in cmdline):
            found.append(int(entry.name))
    assert len(found) == 1, f"stub of {model}: {found}"
    return found[0]


def infer_inputs(module, arrays) -> list:
    """``module.InferInput``s (tritonclient.grpc or .http) holding ``arrays`` (name -> numpy array),
    their Triton datatypes from tritonclient's own mapping."""
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs
