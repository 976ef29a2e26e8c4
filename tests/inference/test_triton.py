"""The Triton backend against a real Triton Inference Server on loopback, and the Triton export.

The server is PyTriton's ``tritonserver`` (CPU), started by ``tests/triton_server.py`` in its own
interpreter: PyTriton's Python-backend stub needs the interpreter it was built for (Debian's python3 works;
a pyenv build fails in the stub). ``EDGE_TRITON_PYTHON`` names that interpreter (default
``~/venv-triton/bin/python``, made by ``scripts/triton-setup``); without it the server tests are skipped.
The client side (``tritonclient[grpc]``) must be installed in the interpreter running the tests.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.imaging.volume import Volume
from edge_runtime.inference.package import DEFAULT_PACKAGE, ModelPackage
from edge_runtime.inference.pipeline import segment
from edge_runtime.inference.runner import BackendUnavailable, RunnerError
from edge_runtime.inference.runner.onnxruntime import OnnxRuntimeRunner
from tests.peers import TRITON_MODEL_NAME, TritonServer, free_port

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed (extra 'triton')")

from edge_runtime.inference.runner.triton import TritonRunner  # noqa: E402

MODEL_NAME = TRITON_MODEL_NAME
ATOL = 1e-5


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(DEFAULT_PACKAGE)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    srv = TritonServer(tmp_path_factory.mktemp("triton"), DEFAULT_PACKAGE)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local(package: ModelPackage) -> Iterator[OnnxRuntimeRunner]:
    with OnnxRuntimeRunner(package, threads=1) as runner:
        yield runner


def windows(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """CT-like windows in the model's normalised range: air, lung, soft tissue and bone."""
    rng = np.random.default_rng(seed)
    hu = rng.choice([-1000.0, -800.0, 40.0, 700.0], size=(n, 1, *shape)) + rng.normal(0, 60, (n, 1, *shape))
    return (np.clip(hu, -1024, 1024) / 1024.0).astype(np.float32)


def copy_package(src: Path, dst: Path, edit) -> ModelPackage:  # noqa: ANN001
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return ModelPackage.load(dst)


# -- the runner against the server ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "shape"),
    # the U-Net takes any size that is a multiple of 16 per axis
    [(1, (64, 96, 96)), (2, (64, 96, 96)), (3, (64, 96, 96)), (3, (16, 48, 32)), (6, (16, 16, 16))],
    ids=["1-patch", "2-patch", "3-patch", "3-small", "6-over-max-batch"],
)
def test_triton_matches_local_onnxruntime(
    server: TritonServer, package: ModelPackage, local: OnnxRuntimeRunner, n: int, shape: tuple[int, int, int]
) -> None:
    x = windows(n, shape, seed=n)
    with TritonRunner(package, url=server.url, model_name=MODEL_NAME) as runner:
        got = runner.infer(x)
        assert runner.max_batch_size == 4  # batches over it are split and pipelined
    want = local.infer(x)
    assert got.shape == want.shape == (n, package.num_classes, *shape)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_describe_names_the_server_and_model(server: TritonServer, package: ModelPackage) -> None:
    with TritonRunner(package, url=server.url, model_name=MODEL_NAME, max_in_flight=3) as runner:
        text = runner.describe()
    assert server.url in text and f"model={MODEL_NAME}" in text and "in_flight=3" in text
    assert "platform=python" in text  # PyTriton serves through Triton's Python backend


def test_infer_many_keeps_order_with_requests_in_flight(
    server: TritonServer, package: ModelPackage, local: OnnxRuntimeRunner
) -> None:
    sizes = [2, 1, 3, 5, 2, 1, 2]
    batches = [windows(n, (16, 48, 48), seed=10 + i) for i, n in enumerate(sizes)]
    with TritonRunner(package, url=server.url, model_name=MODEL_NAME, max_in_flight=3) as runner:
        outs = list(runner.infer_many(iter(batches)))
        # stopping early releases what is in flight; the runner stays usable
        first = next(iter(runner.infer_many(batches)))
        np.testing.assert_allclose(first, outs[0], atol=ATOL, rtol=0)
        with pytest.raises(RunnerError, match="float32"):
            list(runner.infer_many([batches[0].astype(np.float64)]))
        again = runner.infer(batches[3])
    assert [o.shape[0] for o in outs] == sizes
    for b, o in zip(batches, outs, strict=True):
        np.testing.assert_allclose(o, local.infer(b), atol=ATOL, rtol=0)
    np.testing.assert_allclose(again, outs[3], atol=ATOL, rtol=0)


def test_system_shared_memory_gives_the_same_logits_and_is_released(
    server: TritonServer, package: ModelPackage, local: OnnxRuntimeRunner
) -> None:
    x = windows(2, (64, 96, 96), seed=7)
    bigger = windows(3, (64, 96, 96), seed=8)  # larger than the regions made for batch_size: they grow
    small = windows(5, (16, 32, 32), seed=9)  # over max_batch_size: chunks pipelined through two slots
    with TritonRunner(package, url=server.url, model_name=MODEL_NAME, shared_memory="system") as runner:
        assert "shm=system" in runner.describe()
        with grpcclient.InferenceServerClient(server.url) as client:
            regions = {r.name for r in client.get_system_shared_memory_status().regions.values()}
        assert len(regions) == 2 * runner.max_in_flight
        np.testing.assert_allclose(runner.infer(x), local.infer(x), atol=ATOL, rtol=0)
        np.testing.assert_allclose(runner.infer(bigger), local.infer(bigger), atol=ATOL, rtol=0)
        np.testing.assert_allclose(runner.infer(small), local.infer(small), atol=ATOL, rtol=0)
        outs = list(runner.infer_many([x, small, x]))
        np.testing.assert_allclose(outs[1], local.infer(small), atol=ATOL, rtol=0)
        keys = [Path("/dev/shm") / slot.in_key.lstrip("/") for slot in runner._slots]
        assert all(k.exists() for k in keys)
    with grpcclient.InferenceServerClient(server.url) as client:
        left = {r.name for r in client.get_system_shared_memory_status().regions.values()}
    assert not (left & regions), "close() must unregister the runner's regions"
    assert not any(k.exists() for k in keys), "close() must unlink the runner's regions"


def test_segment_through_triton_gives_the_local_labels(server: TritonServer, package: ModelPackage) -> None:
    small = dataclasses.replace(package, patch_size=(16, 64, 64), batch_size=2)
    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[0:40, 0:96, 0:96]
    hu = np.full((40, 96, 96), -1000.0)
    hu[(y - 48) ** 2 + (x - 48) ** 2 < 40**2] = 40.0  # body
    hu[((y - 48) ** 2 + (x - 30) ** 2 < 12**2) | ((y - 48) ** 2 + (x - 66) ** 2 < 12**2)] = -800.0  # lungs
    hu[(y - 75) ** 2 + (x - 48) ** 2 < 6**2] = 700.0  # spine
    hu += rng.normal(0, 30, hu.shape)

    def volume() -> Volume:
        # a fresh array per run: on the model's grid already, segment() normalises the volume's array in place
        return Volume(
            array=hu.astype(np.float32),
            spacing=(2.0, 1.5, 1.5),
            positions=np.arange(40) * 2.0,
            origin=np.zeros(3),
            row_direction=np.array([1.0, 0, 0]),
            column_direction=np.array([0, 1.0, 0]),
            datasets=[],
            regular=True,
        )

    with OnnxRuntimeRunner(small, threads=1) as runner:
        want = segment(volume(), small, runner)
    with TritonRunner(small, url=server.url, model_name=MODEL_NAME) as runner:
        got = segment(volume(), small, runner)
    assert got.windows == want.windows > 1
    assert len(np.unique(want.labels)) >= 3  # background and at least two organs: a real comparison
    np.testing.assert_array_equal(got.labels, want.labels)


# -- errors -----------------------------------------------------------------------------------------------


def test_manifest_with_more_labels_than_the_served_model_is_an_error(
    server: TritonServer, package: ModelPackage, tmp_path: Path
) -> None:
    n = package.num_classes

    def more_labels(m: dict) -> None:
        extra = dict(m["labels"][0], value=n, name="Extra")
        m["labels"].append(extra)

    wrong = copy_package(DEFAULT_PACKAGE, tmp_path / "pkg", more_labels)
    with pytest.raises(
        RunnerError,
        match=rf"model '{MODEL_NAME}' on Triton at {server.url} does not match its "
        rf"manifest: the served output 'logits' has {n} channels; the manifest's "
        rf"labels need {n + 1}",
    ):
        TritonRunner(wrong, url=server.url, model_name=MODEL_NAME)


def test_manifest_with_other_tensor_names_is_an_error(server: TritonServer, tmp_path: Path) -> None:
    def rename(m: dict) -> None:
        m["model"]["input"], m["model"]["output"] = "ct", "probabilities"

    wrong = copy_package(DEFAULT_PACKAGE, tmp_path / "pkg", rename)
    with pytest.raises(RunnerError) as info:
        TritonRunner(wrong, url=server.url, model_name=MODEL_NAME)
    assert "input 'ct' is not served (the model has ['image'])" in str(info.value)
    assert "output 'probabilities' is not served (the model has ['logits'])" in str(info.value)


def test_unknown_model_is_not_ready(server: TritonServer, package: ModelPackage) -> None:
    with pytest.raises(BackendUnavailable, match=rf"model 'no-such-model' on Triton at {server.url} is not ready"):
        TritonRunner(package, url=server.url, model_name="no-such-model")
    with pytest.raises(BackendUnavailable, match=rf"model '{MODEL_NAME}' version 7 on Triton at .* is not ready"):
        TritonRunner(package, url=server.url, model_name=MODEL_NAME, model_version="7")


def test_no_server_is_backend_unavailable(package: ModelPackage) -> None:
    url = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match=rf"Triton server at {url} is not reachable \(gRPC\): UNAVAILABLE"):
        TritonRunner(package, url=url, timeout_s=5)
    assert time.monotonic() - t0 < 10


def test_bad_options_are_errors(server: TritonServer, package: ModelPackage) -> None:
    with pytest.raises(BackendUnavailable, match="Requested shared memory was: 'cuda'"):
        TritonRunner(package, url=server.url, model_name=MODEL_NAME, shared_memory="cuda")
    with pytest.raises(RunnerError, match="max_in_flight must be >= 1"):
        TritonRunner(package, url=server.url, model_name=MODEL_NAME, max_in_flight=0)
    with TritonRunner(package, url=server.url, model_name=MODEL_NAME) as runner:
        with pytest.raises(RunnerError, match="float32"):
            runner.infer(np.zeros((1, 1, 8, 8, 8), dtype=np.float64))


def test_access_token_and_a_server_that_goes_away(
    tmp_path: Path, package: ModelPackage, local: OnnxRuntimeRunner
) -> None:
    """A server that guards its shared-memory API; then the server stops mid-session."""
    token = "s3cret-token"
    srv = TritonServer(tmp_path / "guarded", DEFAULT_PACKAGE, access_token=token)
    try:
        with pytest.raises(BackendUnavailable, match="cannot use system shared memory"):
            TritonRunner(package, url=srv.url, model_name=MODEL_NAME, shared_memory="system")
        runner = TritonRunner(
            package,
            url=srv.url,
            model_name=MODEL_NAME,
            shared_memory="system",
            headers={"triton-grpc-protocol-triton-access-token": token},
            retries=2,
            timeout_s=10,
        )
        x = windows(2, (16, 32, 32), seed=1)
        np.testing.assert_allclose(runner.infer(x), local.infer(x), atol=ATOL, rtol=0)
        srv.stop()
        t0 = time.monotonic()
        with pytest.raises(
            BackendUnavailable,
            match=rf"model '{MODEL_NAME}' on Triton at {srv.url} is unavailable "
            r"after 3 attempts",
        ):
            runner.infer(x)
        assert time.monotonic() - t0 < 10  # two short backoffs, not two timeouts
        runner.close()  # the server is gone: unregistering fails quietly, the local regions are freed
        assert not any((Path("/dev/shm") / s.in_key.lstrip("/")).exists() for s in runner._slots)
    finally:
        srv.stop()


def test_runner_rides_out_a_server_restart(
    tmp_path: Path, package: ModelPackage, local: OnnxRuntimeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UNAVAILABLE is retried: a request sent while the server restarts completes once it is back, and
    shared memory is registered again with the new server."""
    import threading

    from edge_runtime.inference.runner.triton import retry as triton_module

    monkeypatch.setattr(triton_module, "RETRY_BACKOFF_S", (0.5,))
    first = TritonServer(tmp_path / "first", DEFAULT_PACKAGE)
    ports = (first.grpc_port, first.http_port, first.metrics_port)
    started: list[TritonServer] = []
    x = windows(2, (16, 32, 32), seed=5)
    try:
        runner = TritonRunner(
            package, url=first.url, model_name=MODEL_NAME, shared_memory="system", retries=120, timeout_s=10
        )
        np.testing.assert_allclose(runner.infer(x), local.infer(x), atol=ATOL, rtol=0)
        first.stop()
        restart = threading.Thread(
            target=lambda: started.append(TritonServer(tmp_path / "second", DEFAULT_PACKAGE, ports=ports))
        )
        restart.start()
        try:
            got = runner.infer(x)  # retried every 0.5 s until the new server has the model
        finally:
            restart.join()
        np.testing.assert_allclose(got, local.infer(x), atol=ATOL, rtol=0)
        np.testing.assert_allclose(list(runner.infer_many([x, x, x]))[2], got, atol=ATOL, rtol=0)
        with grpcclient.InferenceServerClient(first.url) as client:
            regions = client.get_system_shared_memory_status().regions
        assert len(regions) >= 2, "the runner's regions are registered with the new server"
        runner.close()
    finally:
        first.stop()
        for srv in started:
            srv.stop()


# -- export -----------------------------------------------------------------------------------------------


def test_export_writes_a_config_tritons_protobuf_parses(tmp_path: Path, package: ModelPackage) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from export.triton import write_triton_repository

    entry = write_triton_repository(DEFAULT_PACKAGE, tmp_path / "repo", max_batch_size=8, instances=2, kind="KIND_GPU")
    assert entry == tmp_path / "repo" / package.name
    assert (entry / "1" / "model.onnx").read_bytes() == package.model_path.read_bytes()
    assert json.loads((entry / "manifest.json").read_text()) == package.manifest
    assert not [p for p in entry.rglob(".*")], "no temporary files left behind"

    config = text_format.Parse((entry / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == package.name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    (inp,) = config.input
    (out,) = config.output
    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    assert (inp.name, inp.data_type, list(inp.dims)) == ("image", fp32, [1, -1, -1, -1])
    assert (out.name, out.data_type, list(out.dims)) == ("logits", fp32, [package.num_classes, -1, -1, -1])
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    (group,) = config.instance_group
    assert group.count == 2
    assert group.kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU")
    assert config.parameters["edge_runtime.model_sha256"].string_value == package.model_sha256
    assert config.parameters["edge_runtime.package"].string_value == package.identity


def test_export_options_and_errors(tmp_path: Path, package: ModelPackage) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from export.triton import TritonExportError, write_triton_repository

    repo = tmp_path / "repo"
    entry = write_triton_repository(
        DEFAULT_PACKAGE,
        repo,
        model_name="ct.cpu",
        max_batch_size=4,
        kind="cpu",
        preferred_batch_sizes=[4, 2],
        max_queue_delay_us=500,
        version=3,
    )
    config = text_format.Parse((entry / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.max_batch_size) == ("ct.cpu", 4)
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert (entry / "3" / "model.onnx").is_file()

    with pytest.raises(TritonExportError, match="already exists"):
        write_triton_repository(DEFAULT_PACKAGE, repo, model_name="ct.cpu", version=3)
    write_triton_repository(DEFAULT_PACKAGE, repo, model_name="ct.cpu", version=3, overwrite=True)
    with pytest.raises(TritonExportError, match="instance kind 'KIND_TPU'"):
        write_triton_repository(DEFAULT_PACKAGE, repo, kind="KIND_TPU")
    with pytest.raises(TritonExportError) as info:
        write_triton_repository(DEFAULT_PACKAGE, repo, model_name="ct lung", max_batch_size=0)
    assert "model name 'ct lung'" in str(info.value) and "max_batch_size must be >= 1" in str(info.value)
    with pytest.raises(TritonExportError, match=r"preferred batch sizes must be in 1..max_batch_size \(4\)"):
        write_triton_repository(DEFAULT_PACKAGE, repo, max_batch_size=4, preferred_batch_sizes=[8])


def test_export_rejects_a_manifest_that_does_not_fit_the_model(tmp_path: Path, package: ModelPackage) -> None:
    from export.triton import TritonExportError, write_triton_repository

    n = package.num_classes

    def more_labels(m: dict) -> None:
        m["labels"].append(dict(m["labels"][0], value=n, name="Extra"))

    copy_package(DEFAULT_PACKAGE, tmp_path / "pkg", more_labels)
    with pytest.raises(TritonExportError, match=f"output 'logits' has {n} channels; the manifest needs {n + 1}"):
        write_triton_repository(tmp_path / "pkg", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_export_cli_subcommand(tmp_path: Path) -> None:
    import argparse

    from export.triton import add_triton_parser

    parser = argparse.ArgumentParser(prog="edge-export")
    add_triton_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "triton",
            "--package",
            str(DEFAULT_PACKAGE),
            "--repo",
            str(tmp_path / "repo"),
            "--kind",
            "KIND_CPU",
            "--max-batch-size",
            "2",
            "--model-name",
            "ct",
        ]
    )
    assert args.func(args) == 0
    assert (tmp_path / "repo" / "ct" / "config.pbtxt").is_file()
    assert args.func(args) == 1  # the version folder exists now


def test_runner_rejects_a_served_model_with_another_sha256(package: ModelPackage) -> None:
    """The identity check on entries written by ``edge-export triton`` (config parameters); no server."""
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig(name="m", max_batch_size=4)
    config.input.add(name="image", data_type=model_config_pb2.TYPE_FP32, dims=[1, -1, -1, -1])
    config.output.add(name="logits", data_type=model_config_pb2.TYPE_FP32, dims=[package.num_classes, -1, -1, -1])
    runner = TritonRunner.__new__(TritonRunner)
    runner.package, runner.model_name, runner.model_version, runner.url = package, "m", "", "host:8001"
    runner._check_signature(config)  # no parameter: nothing to compare
    assert runner.model_sha256 is None
    config.parameters["edge_runtime.model_sha256"].string_value = package.model_sha256
    runner._check_signature(config)
    config.parameters["edge_runtime.model_sha256"].string_value = "0" * 64
    with pytest.raises(RunnerError, match="the served model file has sha256 0000"):
        runner._check_signature(config)
    config.output[0].data_type = model_config_pb2.TYPE_FP16
    config.output[0].dims[1] = 48
    with pytest.raises(RunnerError, match="output 'logits' is TYPE_FP16; this runner needs TYPE_FP32"):
        runner._check_signature(config)


@pytest.mark.e2e
def test_service_segments_a_pushed_series_through_triton(server: TritonServer, tmp_path: Path) -> None:
    """The whole service with --backend triton: the SEG is the one the local runner gives."""
    from tests.peers import ServiceProcess, StoreSCP, storescu
    from tests.test_e2e import check_seg, new_series

    pacs = StoreSCP(tmp_path / "pacs")
    svc = ServiceProcess(
        tmp_path / "svc",
        "--destination",
        pacs.address,
        "--quiet-seconds",
        "1",
        "--backend",
        "triton",
        "--triton-url",
        server.url,
        "--triton-model",
        server.model_name,
    )
    try:
        code, body = svc.http_get("/readyz")
        assert code == 200 and "ready" in json.loads(body)["runner"]
        info = new_series(tmp_path / "ct", seed=21)
        storescu(svc.port, list(info.paths))
        check_seg(pacs.wait_for_seg(info.series_uid, timeout=90), info)
        assert "triton" in svc.log().lower()
    finally:
        svc.stop()
        pacs.stop()


def test_service_without_triton_fails_or_falls_back_loudly(tmp_path: Path, package: ModelPackage) -> None:
    from tests.peers import ServiceProcess

    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_runtime",
            "serve",
            "--backend",
            "triton",
            "--triton-url",
            url,
            "--spool",
            str(tmp_path / "s"),
            "--output",
            str(tmp_path / "o"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "not reachable" in out.stderr
    svc = ServiceProcess(
        tmp_path / "fb", "--backend", "triton", "--triton-url", url, "--fallback-backend", "onnxruntime"
    )
    try:
        assert "BACKEND FALLBACK" in svc.log()
        code, body = svc.http_get("/readyz")
        assert code == 200 and "not reachable" in json.loads(body)["fallback"]
    finally:
        svc.stop()
