"""Triton Inference Server backend: the package's model runs on a (usually GPU) Triton server over gRPC.

The local package still decides everything around the model (preprocessing, patch size, labels); Triton
only maps windows to logits. At construction the runner checks that the server is live and ready, that the
model is ready, and that the served model's signature matches the manifest (input/output names, FP32,
channel counts, fixed spatial dims vs the patch size, and the model's SHA-256 when the entry was written
by ``edge-export triton``). Any mismatch is an error before the first series, never a wrong segmentation.

Tensors always travel as raw binary (gRPC ``raw_input_contents``), or through system shared memory when
``shared_memory="system"`` and the server runs on this host (same ``/dev/shm``). Transient gRPC failures
(``UNAVAILABLE``, ``NOT_FOUND`` while a restarted server loads the model, ``RESOURCE_EXHAUSTED``,
``ABORTED``) are retried ``retries`` times with a short backoff, and after a possible restart the served
model is checked against the manifest again; a request that runs past ``timeout_s`` is not retried (the
server is slow, not gone, and a retry would add load).

``infer_many`` keeps up to ``max_in_flight`` requests outstanding so the server's dynamic batcher can merge
them and the network hop overlaps with compute; ``infer`` (what the sliding window calls) sends one
request, or pipelines the chunks when a batch is larger than the server's ``max_batch_size``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from edge_runtime.extras import require
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.runner.base import BackendUnavailable, Runner, RunnerError

log = logging.getLogger(__name__)

SHARED_MEMORY_MODES = ("none", "system")
#: retried: the server is (re)starting or (re)loading the model (NOT_FOUND: the model was there at
#: construction), or it sheds load
TRANSIENT_STATUS = (
    "StatusCode.UNAVAILABLE",
    "StatusCode.NOT_FOUND",
    "StatusCode.RESOURCE_EXHAUSTED",
    "StatusCode.ABORTED",
)
#: after these the server may have restarted: check the model again and re-register shared memory
RESTART_STATUS = ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND")
#: model-config parameter written by ``edge-export triton``: the SHA-256 of the model file in the entry
SHA_PARAMETER = "edge_runtime.model_sha256"
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0)


class TritonRunner(Runner):
    name = "triton"

    def __init__(
        self,
        package: ModelPackage,
        *,
        url: str = "127.0.0.1:8001",
        model_name: str | None = None,
        model_version: str = "",
        timeout_s: float = 30.0,
        max_in_flight: int = 2,
        retries: int = 2,
        shared_memory: str = "none",
        headers: dict[str, str] | None = None,
        ssl: bool = False,
    ):
        """``headers`` go with every call: a server started with ``--grpc-restricted-protocol
        shared-memory:triton-access-token=SECRET`` wants ``{"triton-grpc-protocol-triton-access-token":
        "SECRET"}`` (Triton prefixes gRPC restriction headers with ``triton-grpc-protocol-``).
        ``model_version`` "" lets the server pick its policy's version."""
        super().__init__(package)
        grpcclient = require(
            "tritonclient.grpc", feature="the Triton backend", extra="triton", package="tritonclient[grpc]"
        )
        from tritonclient.utils import InferenceServerException

        if shared_memory not in SHARED_MEMORY_MODES:
            raise BackendUnavailable(
                f"Requested shared memory was: {shared_memory!r}, but this backend knows: "
                f"{', '.join(SHARED_MEMORY_MODES)}"
            )
        if max_in_flight < 1 or retries < 0 or timeout_s <= 0:
            raise RunnerError(
                "max_in_flight must be >= 1, retries >= 0 and timeout_s > 0; "
                f"got {max_in_flight}, {retries}, "
                f"{timeout_s}"
            )
        self._grpc = grpcclient
        self._error_type = InferenceServerException
        self.url = url
        self.model_name = model_name or package.name
        self.model_version = str(model_version)
        self.timeout_s = float(timeout_s)
        self.max_in_flight = int(max_in_flight)
        self.retries = int(retries)
        self.shared_memory = shared_memory
        self.headers = dict(headers) if headers else None
        self._slots: list[_ShmSlot] = []
        self._free_slots: collections.deque[_ShmSlot] = collections.deque()
        self._slot_lock = threading.Lock()
        self._closed = False
        try:
            self._client = grpcclient.InferenceServerClient(url=url, ssl=ssl)
        except Exception as exc:
            raise BackendUnavailable(f"cannot create a Triton gRPC client for {url}: {exc}") from exc
        try:
            self._check_server()
            self._config = self._check_model()
            if shared_memory == "system":
                self._setup_shared_memory()
        except BaseException:
            self.close()
            raise

    # -- construction checks -------------------------------------------------------------------------------

    def _where(self) -> str:
        version = f" version {self.model_version}" if self.model_version else ""
        return f"model {self.model_name!r}{version} on Triton at {self.url}"

    def _check_server(self) -> None:
        timeout = min(self.timeout_s, 10.0)
        try:
            live = self._client.is_server_live(headers=self.headers, client_timeout=timeout)
            ready = live and self._client.is_server_ready(headers=self.headers, client_timeout=timeout)
        except self._error_type as exc:
            raise BackendUnavailable(
                f"Triton server at {self.url} is not reachable (gRPC): {_describe_error(exc)}"
            ) from exc
        if not live:
            raise BackendUnavailable(f"Triton server at {self.url} is not live")
        if not ready:
            raise BackendUnavailable(f"Triton server at {self.url} is live but not ready")

    def _check_model(self) -> Any:
        timeout = min(self.timeout_s, 10.0)
        try:
            ready = self._client.is_model_ready(
                self.model_name, self.model_version, headers=self.headers, client_timeout=timeout
            )
        except self._error_type as exc:
            raise BackendUnavailable(f"cannot ask for {self._where()}: {_describe_error(exc)}") from exc
        if not ready:
            raise BackendUnavailable(f"{self._where()} is not ready{self._served_models_hint()}")
        try:
            config = self._client.get_model_config(
                self.model_name, self.model_version, headers=self.headers, client_timeout=timeout
            ).config
            metadata = self._client.get_model_metadata(
                self.model_name, self.model_version, headers=self.headers, client_timeout=timeout
            )
        except self._error_type as exc:
            raise BackendUnavailable(f"cannot read the config of {self._where()}: {_describe_error(exc)}") from exc
        self._platform = metadata.platform or config.backend or config.platform
        self._served_version = metadata.versions[-1] if metadata.versions else "?"
        self._check_signature(config)
        return config

    def ready(self) -> tuple[bool, str]:
        try:
            self._check_server()
            timeout = min(self.timeout_s, 10.0)
            ok = self._client.is_model_ready(
                self.model_name, self.model_version, headers=self.headers, client_timeout=timeout
            )
        except (BackendUnavailable, self._error_type) as exc:
            return False, str(exc)
        return bool(ok), self._where() + (" ready" if ok else " not ready")

    def _served_models_hint(self) -> str:
        try:
            index = self._client.get_model_repository_index(headers=self.headers, client_timeout=5.0)
        except Exception:  # the repository API may be restricted; the hint is optional
            return ""
        models = sorted(
            f"{m.name}{' v' + m.version if m.version else ''} ({m.state or 'UNKNOWN'})" for m in index.models
        )
        return f"; the server has: {', '.join(models) if models else 'no models'}"

    def _check_signature(self, config: Any) -> None:
        """Compare the served model's config with the manifest; every problem is reported at once."""
        pkg = self.package
        problems = []
        # max_batch_size > 0: Triton owns the batch axis and dims are per item; 0: dims include the batch
        self.max_batch_size = int(config.max_batch_size)
        batched = self.max_batch_size > 0
        self._chunk: int | None = self.max_batch_size if batched else None
        inputs = {i.name: i for i in config.input}
        outputs = {o.name: o for o in config.output}
        fp32 = self._config_enum("TYPE_FP32")
        if len(inputs) != 1:
            problems.append(f"the served model has inputs {sorted(inputs)}; this runner sends exactly one")
        for tensors, name, channels, what in (
            (inputs, pkg.input_name, pkg.input_channels, "input"),
            (outputs, pkg.output_name, pkg.num_classes, "output"),
        ):
            if name not in tensors:
                problems.append(f"{what} {name!r} is not served (the model has {sorted(tensors)})")
                continue
            t = tensors[name]
            if t.data_type != fp32:
                problems.append(f"{what} {name!r} is {self._type_name(t.data_type)}; this runner needs TYPE_FP32")
            dims = [int(d) for d in t.dims]
            per_item = dims if batched else dims[1:]
            if len(per_item) != 4:
                shown = (["batch"] if batched else []) + dims
                problems.append(f"{what} {name!r} has dims {shown}; expected (N, C, Z, Y, X)")
                continue
            if not batched and what == "input" and dims[0] > 0:
                self._chunk = dims[0]  # a fixed batch dimension: send exactly that many windows at a time
            if per_item[0] != -1 and per_item[0] != channels:
                needs = "the manifest's labels need" if what == "output" else "the manifest says"
                problems.append(f"the served {what} {name!r} has {per_item[0]} channels; {needs} {channels}")
            if any(d != -1 and d != p for d, p in zip(per_item[1:], pkg.patch_size, strict=True)):
                problems.append(
                    f"{what} {name!r} has fixed spatial dims {per_item[1:]}, not the patch size {list(pkg.patch_size)}"
                )
        sha = config.parameters[SHA_PARAMETER].string_value if SHA_PARAMETER in config.parameters else ""
        if sha and pkg.model_sha256 and sha != pkg.model_sha256:
            problems.append(
                f"the served model file has sha256 {sha}; the local package's model has {pkg.model_sha256} "
                "(re-export the Triton entry from this package, or use the package it was exported from)"
            )
        self.model_sha256 = sha or None
        if problems:
            raise RunnerError(f"{self._where()} does not match its manifest: " + "; ".join(problems))

    def _config_enum(self, name: str) -> int:
        from tritonclient.grpc import model_config_pb2

        return int(model_config_pb2.DataType.Value(name))

    def _type_name(self, value: int) -> str:
        from tritonclient.grpc import model_config_pb2

        try:
            return str(model_config_pb2.DataType.Name(value))
        except ValueError:
            return str(value)

    # -- shared memory -------------------------------------------------------------------------------------

    def _setup_shared_memory(self) -> None:
        pkg = self.package
        items = self.package.batch_size if not self._chunk else min(self._chunk, self.package.batch_size)
        voxels = int(np.prod(pkg.patch_size))
        in_bytes = items * pkg.input_channels * voxels * 4
        out_bytes = items * pkg.num_classes * voxels * 4
        self._shm_sizes = (in_bytes, out_bytes)
        for _ in range(self.max_in_flight):  # made up front, so a server that cannot map them fails here
            self._free_slots.append(self._new_slot())

    def _new_slot(self) -> _ShmSlot:
        slot = _ShmSlot(self, f"edge-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        self._slots.append(slot)
        try:
            slot.ensure(*self._shm_sizes)
        except BaseException:
            self._slots.remove(slot)
            slot.destroy()
            raise
        return slot

    def _take_slot(self) -> _ShmSlot | None:
        """A free shared-memory slot; None (plain gRPC transfer) when shared memory is off or unavailable."""
        if self.shared_memory == "none" or self._closed:
            return None
        with self._slot_lock:
            if self._free_slots:
                return self._free_slots.popleft()
            if len(self._slots) >= self.max_in_flight:
                return None
        try:
            return self._new_slot()  # replaces a slot retired after a failed request
        except RunnerError as exc:
            log.warning("no shared memory for this request, sending it over gRPC: %s", exc)
            return None

    def _release(self, slot: _ShmSlot | None, ok: bool) -> None:
        """Return a slot after its request completed; after a failure retire it instead, since the
        server may still be writing into its output region."""
        if slot is None:
            return
        if ok and not self._closed:
            with self._slot_lock:
                self._free_slots.append(slot)
            return
        with self._slot_lock:
            if slot in self._slots:
                self._slots.remove(slot)
        slot.destroy()

    # -- inference -----------------------------------------------------------------------------------------

    def _chunks(self, batch: np.ndarray) -> list[np.ndarray]:
        if not self._chunk or len(batch) <= self._chunk:
            return [batch]
        return [batch[i : i + self._chunk] for i in range(0, len(batch), self._chunk)]

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        chunks = self._chunks(batch)
        if len(chunks) == 1:
            return self._call(batch)
        return np.concatenate(list(self._pipeline(chunks)), axis=0)

    def infer_many(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Logits for each batch, in order, with up to ``max_in_flight`` requests outstanding.

        Batches are consumed lazily (at most ``max_in_flight`` ahead of the caller), so a generator of
        windows never materialises a whole series. Each batch is checked like ``infer``'s.
        """
        pending: collections.deque[tuple[np.ndarray, list[np.ndarray]]] = collections.deque()
        flat: collections.deque[int] = collections.deque()  # chunk counts per batch, in order

        def chunked() -> Iterator[np.ndarray]:
            for b in batches:
                self._check_batch(b)
                b = np.ascontiguousarray(b)
                parts = self._chunks(b)
                flat.append(len(parts))
                pending.append((b, []))
                yield from parts

        results = self._pipeline(chunked())
        for out in results:
            b, outs = pending[0]
            outs.append(out)
            if len(outs) == flat[0]:
                pending.popleft()
                flat.popleft()
                logits = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)
                expected = (b.shape[0], self.package.num_classes, *b.shape[2:])
                if logits.shape != expected:
                    raise RunnerError(f"{self.name} returned shape {logits.shape}; expected {expected}")
                yield logits

    def _check_batch(self, batch: np.ndarray) -> None:
        # the same checks as Runner.infer, for infer_many
        if batch.dtype != np.float32:
            raise RunnerError(f"batch dtype is {batch.dtype}; runners take float32")
        if batch.ndim != 5 or batch.shape[1] != self.package.input_channels:
            raise RunnerError(f"batch shape is {batch.shape}; expected (N, {self.package.input_channels}, Z, Y, X)")

    def _pipeline(self, chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Send chunks with at most ``max_in_flight`` outstanding; yield their outputs in order."""
        window: collections.deque[_Request] = collections.deque()
        source = iter(chunks)
        try:
            while True:
                while len(window) < self.max_in_flight:
                    chunk = next(source, None)
                    if chunk is None:
                        break
                    req = _Request(chunk)
                    self._submit(req)
                    window.append(req)
                if not window:
                    return
                req = window[0]
                out = self._collect(req)
                window.popleft()
                yield out
        finally:
            # The caller stopped early or an error escaped: let what is in flight finish (not cancel: the
            # server would go on writing into the output regions) and release the slots.
            for req in window:
                ok = False
                if req.future is not None:
                    try:
                        req.future.result(timeout=self.timeout_s + 5.0)
                        ok = True
                    except Exception:
                        pass
                self._release(req.slot, ok)
                req.slot = None

    def _submit(self, req: _Request) -> None:
        req.slot = self._take_slot()
        req.future = None
        fut: Future = Future()

        def done(result: Any, error: Any) -> None:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        try:
            inputs, outputs = self._request_tensors(req.batch, req.slot)
            req.context = self._client.async_infer(
                self.model_name,
                inputs,
                callback=done,
                model_version=self.model_version,
                outputs=outputs,
                client_timeout=self.timeout_s,
                headers=self.headers,
            )
        except BaseException:
            self._release(req.slot, ok=True)  # never reached the server
            req.slot = None
            raise
        req.future = fut

    def _collect(self, req: _Request) -> np.ndarray:
        while True:
            assert req.future is not None
            try:
                # the client enforces timeout_s; the margin only guards against a lost callback
                result = req.future.result(timeout=self.timeout_s + 5.0)
            except self._error_type as exc:
                self._release(req.slot, ok=False)
                req.slot = None
                if _transient(exc) and req.attempt < self.retries:
                    self._backoff(req.attempt, exc)
                    req.attempt += 1
                    self._submit(req)
                    continue
                raise self._failure(exc, req.attempt) from exc
            except FutureTimeout as exc:  # (not the builtin TimeoutError on Python 3.10)
                raise RunnerError(f"no answer from {self._where()} within {self.timeout_s + 5.0:.0f} s") from exc
            ok = False
            try:
                out = self._read_output(result, req.slot)
                ok = True
                return out
            finally:
                self._release(req.slot, ok)
                req.slot = None

    def _call(self, batch: np.ndarray) -> np.ndarray:
        """One synchronous request with retries."""
        for attempt in itertools.count():
            slot = self._take_slot()
            ok = False
            try:
                inputs, outputs = self._request_tensors(batch, slot)
                try:
                    result = self._client.infer(
                        self.model_name,
                        inputs,
                        model_version=self.model_version,
                        outputs=outputs,
                        client_timeout=self.timeout_s,
                        headers=self.headers,
                    )
                except self._error_type as exc:
                    if not (_transient(exc) and attempt < self.retries):
                        raise self._failure(exc, attempt) from exc
                    retry_after = exc
                else:
                    out = self._read_output(result, slot)
                    ok = True
                    return out
            finally:
                self._release(slot, ok)
            self._backoff(attempt, retry_after)
        raise AssertionError("unreachable")  # pragma: no cover

    def _request_tensors(self, batch: np.ndarray, slot: _ShmSlot | None) -> tuple[list[Any], list[Any]]:
        pkg = self.package
        inp = self._grpc.InferInput(pkg.input_name, list(batch.shape), "FP32")
        out = self._grpc.InferRequestedOutput(pkg.output_name)
        out_bytes = batch.shape[0] * pkg.num_classes * int(np.prod(batch.shape[2:])) * 4
        if slot is not None:
            slot.ensure(batch.nbytes, out_bytes)
            slot.write(batch)
            inp.set_shared_memory(slot.in_name, batch.nbytes)
            out.set_shared_memory(slot.out_name, out_bytes)
        else:
            inp.set_data_from_numpy(batch)  # raw binary in the gRPC message, never JSON
        return [inp], [out]

    def _read_output(self, result: Any, slot: _ShmSlot | None) -> np.ndarray:
        name = self.package.output_name
        if slot is not None:
            meta = result.get_output(name)
            if meta is None:
                raise RunnerError(f"{self._where()} returned no output {name!r}")
            if meta.datatype != "FP32":
                raise RunnerError(f"{self._where()} returned {meta.datatype} for {name!r}; expected FP32")
            return slot.read(tuple(int(d) for d in meta.shape))
        out = result.as_numpy(name)
        if out is None:
            raise RunnerError(f"{self._where()} returned no output {name!r}")
        if out.dtype != np.float32:
            raise RunnerError(f"{self._where()} returned {out.dtype} for {name!r}; expected float32")
        return out

    def _backoff(self, attempt: int, exc: Exception) -> None:
        delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
        log.warning(
            "Triton request to %s failed (%s); retry %d of %d in %.1f s",
            self._where(),
            _describe_error(exc),
            attempt + 1,
            self.retries,
            delay,
        )
        time.sleep(delay)
        if _status(exc) in RESTART_STATUS:
            # The server may have restarted, possibly with another model: check it again (a mismatch is an
            # error, not something to retry), and register the idle regions with it (it forgot them).
            try:
                self._config = self._check_model()
            except BackendUnavailable as down:
                log.debug("still not ready: %s", down)
                return
            with self._slot_lock:
                idle = list(self._free_slots)
            for slot in idle:
                slot.register(force=True)

    def _failure(self, exc: Exception, attempt: int) -> RunnerError:
        tries = f" after {attempt + 1} attempts" if attempt else ""
        if _status(exc) == "StatusCode.DEADLINE_EXCEEDED":
            return RunnerError(f"{self._where()} did not answer within {self.timeout_s:g} s{tries}")
        if _status(exc) == "StatusCode.UNAVAILABLE":
            return BackendUnavailable(f"{self._where()} is unavailable{tries}: {_describe_error(exc)}")
        return RunnerError(f"inference on {self._where()} failed{tries}: {_describe_error(exc)}")

    # -- description and cleanup -----------------------------------------------------------------------------

    def describe(self) -> str:
        shm = f" shm={self.shared_memory}" if self.shared_memory != "none" else ""
        return (
            f"triton {self.url} model={self.model_name} v{getattr(self, '_served_version', '?')} "
            f"platform={getattr(self, '_platform', '?')} max_batch={getattr(self, 'max_batch_size', '?')} "
            f"in_flight={self.max_in_flight}{shm}"
        )

    def close(self) -> None:
        """Unregister and free shared-memory regions and close the channel; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots:
            slot.destroy()
        self._slots.clear()
        self._free_slots.clear()
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a channel to a dead server must not mask the real error
                pass


class _Request:
    __slots__ = ("batch", "slot", "future", "context", "attempt")

    def __init__(self, batch: np.ndarray):
        self.batch = batch
        self.slot: _ShmSlot | None = None
        self.future: Future | None = None
        self.context: Any = None
        self.attempt = 0


class _ShmSlot:
    """One input and one output system shared-memory region, registered with the server."""

    def __init__(self, runner: TritonRunner, tag: str):
        from tritonclient.utils import shared_memory

        self._shm = shared_memory
        self.runner = runner
        self.in_name, self.out_name = f"{tag}-in", f"{tag}-out"
        self.in_key, self.out_key = f"/{tag}-in", f"/{tag}-out"
        self.in_handle: Any = None
        self.out_handle: Any = None
        self.in_bytes = self.out_bytes = 0
        self.registered = False

    def ensure(self, in_bytes: int, out_bytes: int) -> None:
        """Make the regions at least this large (grown, never shrunk) and registered."""
        if in_bytes <= self.in_bytes and out_bytes <= self.out_bytes and self.registered:
            return
        self.destroy()
        self.in_bytes, self.out_bytes = max(in_bytes, self.in_bytes), max(out_bytes, self.out_bytes)
        try:
            self.in_handle = self._shm.create_shared_memory_region(
                self.in_name, self.in_key, self.in_bytes, create_only=True
            )
            self.out_handle = self._shm.create_shared_memory_region(
                self.out_name, self.out_key, self.out_bytes, create_only=True
            )
        except Exception as exc:
            self.destroy()
            raise BackendUnavailable(f"cannot create system shared memory ({self.in_key}): {exc}") from exc
        self.register()

    def register(self, *, force: bool = False) -> None:
        r = self.runner
        client, headers = r._client, r.headers
        try:
            if force:
                for name in (self.in_name, self.out_name):
                    try:
                        client.unregister_system_shared_memory(name, headers=headers, client_timeout=5.0)
                    except Exception:
                        pass
            client.register_system_shared_memory(
                self.in_name, self.in_key, self.in_bytes, headers=headers, client_timeout=10.0
            )
            client.register_system_shared_memory(
                self.out_name, self.out_key, self.out_bytes, headers=headers, client_timeout=10.0
            )
        except r._error_type as exc:
            if force:  # best effort during a retry; the retry itself reports the failure
                log.warning("re-registering shared memory with %s failed: %s", r.url, _describe_error(exc))
                return
            raise BackendUnavailable(
                f"Triton at {r.url} cannot use system shared memory ({_describe_error(exc)}); "
                "it works only when the server shares this host's /dev/shm (and, if the server restricts "
                "its shared-memory API, with the access header); use shared_memory='none' otherwise"
            ) from exc
        self.registered = True

    def write(self, batch: np.ndarray) -> None:
        self._shm.set_shared_memory_region(self.in_handle, [batch])

    def read(self, shape: tuple[int, ...]) -> np.ndarray:
        nbytes = int(np.prod(shape)) * 4
        if nbytes > self.out_bytes:
            raise RunnerError(f"the output {shape} does not fit the shared-memory region ({self.out_bytes} bytes)")
        view = self._shm.get_contents_as_numpy(self.out_handle, np.float32, shape)
        out = np.array(view, copy=True)  # the region is reused by the next request
        del view
        return out

    def destroy(self) -> None:
        r = self.runner
        if self.registered:
            for name in (self.in_name, self.out_name):
                try:
                    r._client.unregister_system_shared_memory(name, headers=r.headers, client_timeout=5.0)
                except Exception as exc:  # the server may be gone; the local regions are freed regardless
                    log.debug("unregistering %s from %s failed: %s", name, r.url, exc)
            self.registered = False
        for attr in ("in_handle", "out_handle"):
            handle = getattr(self, attr)
            if handle is not None:
                try:
                    self._shm.destroy_shared_memory_region(handle)
                except Exception as exc:
                    log.debug("freeing shared memory failed: %s", exc)
                setattr(self, attr, None)


def _status(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else status or "")


def _transient(exc: Exception) -> bool:
    return _status(exc) in TRANSIENT_STATUS


def _describe_error(exc: Exception) -> str:
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    status = _status(exc)
    return f"{status.replace('StatusCode.', '')}: {text}" if status else str(text)
