"""A real Triton Inference Server (PyTriton's ``tritonserver``, CPU) serving a model package."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.peers.base import REPO, free_port, skip_missing

# -- Triton Inference Server ----------------------------------------------------------------------------------

#: ``tests/triton_server.py`` serves a model package with PyTriton's ``tritonserver`` (CPU)
TRITON_SERVER_SCRIPT = REPO / "tests" / "triton_server.py"
TRITON_MODEL_NAME = "ct-test"


def triton_python() -> str:
    """The interpreter that runs PyTriton, or skip with the reason."""
    path = os.environ.get("EDGE_TRITON_PYTHON") or str(Path.home() / "venv-triton" / "bin" / "python")
    if not Path(path).is_file():
        skip_missing(f"no PyTriton interpreter at {path} (run scripts/triton-setup or set EDGE_TRITON_PYTHON)")
    probe = subprocess.run(
        [path, "-c", "import pytriton.triton, onnxruntime, numpy"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        skip_missing(f"{path} cannot import pytriton/onnxruntime: {probe.stderr.strip().splitlines()[-1:]}")
    return path


class TritonServer:
    """``tests/triton_server.py`` in a subprocess, on free loopback ports."""

    def __init__(
        self,
        workdir: Path,
        package_dir: Path,
        *,
        model_name: str = TRITON_MODEL_NAME,
        max_batch_size: int = 4,
        access_token: str | None = None,
        ports: tuple[int, int, int] | None = None,
        timeout: float = 180.0,
        threads: int = 1,
    ):
        python = triton_python()
        workdir.mkdir(parents=True, exist_ok=True)
        self.grpc_port, self.http_port, self.metrics_port = ports or (free_port(), free_port(), free_port())
        self.url = f"127.0.0.1:{self.grpc_port}"
        self.model_name = model_name
        self.log_path = workdir / "triton.log"
        self._log = open(self.log_path, "ab")
        cmd = [
            python,
            str(TRITON_SERVER_SCRIPT),
            "--package",
            str(package_dir),
            "--model-name",
            model_name,
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--metrics-port",
            str(self.metrics_port),
            "--max-batch-size",
            str(max_batch_size),
            "--threads",
            str(threads),
        ]
        if access_token:
            cmd += ["--access-token", access_token]
        # PYTHONPATH etc. from the test interpreter must not leak into the server's
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
        )
        try:
            self._wait_ready(timeout)
        except Exception:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        import tritonclient.grpc as grpcclient

        with grpcclient.InferenceServerClient(self.url) as client:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the Triton server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
                try:
                    if client.is_model_ready(self.model_name, client_timeout=2.0):
                        return
                except Exception:  # not listening yet: ask again until the timeout
                    pass
                time.sleep(0.25)
        raise TimeoutError(f"Triton model not ready after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the script stops tritonserver and PyTriton's proxy processes on SIGTERM
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()
