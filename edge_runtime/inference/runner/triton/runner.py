"""The Triton runner: checks the server and the served model at construction, then sends windows over gRPC.

Requests travel as raw binary (gRPC ``raw_input_contents``) or through system shared memory
(:mod:`edge_runtime.inference.runner.triton.shm`); transient failures are retried as
:mod:`edge_runtime.inference.runner.triton.retry` decides, and after a possible restart the served model is
checked again (:mod:`edge_runtime.inference.runner.triton.served_model`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

import edge_runtime.inference.runner.triton.retry as retry
from edge_runtime.errors import BackendUnavailable, RunnerError
from edge_runtime.extras import require
from edge_runtime.inference.package import ModelPackage
from edge_runtime.inference.runner.base import Runner
from edge_runtime.inference.runner.triton.retry import describe_error
from edge_runtime.inference.runner.triton.served_model import ServedModel, check_served_model
from edge_runtime.inference.runner.triton.shm import ShmPool, ShmSlot

log = logging.getLogger(__name__)

SHARED_MEMORY_MODES = ("none", "system")
#: the server-side checks at construction and after a restart wait at most this long per call
CHECK_TIMEOUT_S = 10.0


class TritonRunner(Runner):
    """A model package whose model a Triton Inference Server runs; ``infer_many`` pipelines requests."""

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
        self._served: ServedModel | None = None
        self._platform = self._served_version = "?"  # from the model's metadata
        self._shm: ShmPool | None = None
        self._closed = False
        try:
            self._client = grpcclient.InferenceServerClient(url=url, ssl=ssl)
        except Exception as exc:
            raise BackendUnavailable(f"cannot create a Triton gRPC client for {url}: {exc}") from exc
        try:
            self._check_server()
            self._check_model()
            if shared_memory == "system":
                self._shm = self._shared_memory_pool()
        except BaseException:
            self.close()
            raise

    @property
    def max_batch_size(self) -> int:
        """The served config's ``max_batch_size`` (0: the model's dims include the batch)."""
        return self._served_model.max_batch_size

    @property
    def model_sha256(self) -> str | None:
        """The served model file's SHA-256 when its entry records it (``edge-export triton`` does)."""
        return self._served_model.model_sha256

    @property
    def _served_model(self) -> ServedModel:
        if self._served is None:
            raise RunnerError(f"{self._where()} was never checked (the runner did not start)")
        return self._served

    @property
    def _slots(self) -> list[ShmSlot]:
        """The shared-memory slots that exist now: none without shared memory, none after ``close``."""
        return self._shm.slots if self._shm is not None else []

    # -- construction checks -------------------------------------------------------------------------------

    def _where(self) -> str:
        version = f" version {self.model_version}" if self.model_version else ""
        return f"model {self.model_name!r}{version} on Triton at {self.url}"

    def _check_server(self) -> None:
        timeout = min(self.timeout_s, CHECK_TIMEOUT_S)
        try:
            live = self._client.is_server_live(headers=self.headers, client_timeout=timeout)
            ready = live and self._client.is_server_ready(headers=self.headers, client_timeout=timeout)
        except self._error_type as exc:
            raise BackendUnavailable(
                f"Triton server at {self.url} is not reachable (gRPC): {describe_error(exc)}"
            ) from exc
        if not live:
            raise BackendUnavailable(f"Triton server at {self.url} is not live")
        if not ready:
            raise BackendUnavailable(f"Triton server at {self.url} is live but not ready")

    def _check_model(self) -> None:
        timeout = min(self.timeout_s, CHECK_TIMEOUT_S)
        try:
            ready = self._client.is_model_ready(
                self.model_name, self.model_version, headers=self.headers, client_timeout=timeout
            )
        except self._error_type as exc:
            raise BackendUnavailable(f"cannot ask for {self._where()}: {describe_error(exc)}") from exc
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
            raise BackendUnavailable(f"cannot read the config of {self._where()}: {describe_error(exc)}") from exc
        self._platform = metadata.platform or config.backend or config.platform
        self._served_version = metadata.versions[-1] if metadata.versions else "?"
        self._check_signature(config)

    def _check_signature(self, config: Any) -> None:
        """The served model's config against the manifest; every problem is reported at once."""
        self._served = check_served_model(config, self.package, self._where())

    def ready(self) -> tuple[bool, str]:
        try:
            self._check_server()
            timeout = min(self.timeout_s, CHECK_TIMEOUT_S)
            ok = self._client.is_model_ready(
                self.model_name, self.model_version, headers=self.headers, client_timeout=timeout
            )
        except (BackendUnavailable, self._error_type) as exc:
            return False, str(exc)
        return bool(ok), self._where() + (" ready" if ok else " not ready")

    def _served_models_hint(self) -> str:
        try:
            index = self._client.get_model_repository_index(headers=self.headers, client_timeout=5.0)
        except Exception as exc:  # the repository API may be restricted; the hint is optional
            log.debug("no model repository index from %s: %s", self.url, exc)
            return ""
        models = sorted(
            f"{m.name}{' v' + m.version if m.version else ''} ({m.state or 'UNKNOWN'})" for m in index.models
        )
        return f"; the server has: {', '.join(models) if models else 'no models'}"

    def _shared_memory_pool(self) -> ShmPool:
        """One slot per request in flight, each sized for the windows one request carries."""
        pkg = self.package
        chunk = self._served_model.chunk
        items = pkg.batch_size if not chunk else min(chunk, pkg.batch_size)
        voxels = int(np.prod(pkg.patch_size))
        return ShmPool(
            self._client,
            url=self.url,
            headers=self.headers,
            size=self.max_in_flight,
            in_bytes=items * pkg.input_channels * voxels * 4,
            out_bytes=items * pkg.num_classes * voxels * 4,
        )

    def _take_slot(self) -> ShmSlot | None:
        """A free shared-memory slot; None (plain gRPC transfer) when shared memory is off or unavailable."""
        if self._shm is None or self._closed:
            return None
        return self._shm.take()

    def _release(self, slot: ShmSlot | None, ok: bool) -> None:
        if slot is not None and self._shm is not None:
            self._shm.release(slot, ok)

    # -- inference -----------------------------------------------------------------------------------------

    def _chunks(self, batch: np.ndarray) -> list[np.ndarray]:
        chunk = self._served_model.chunk
        if not chunk or len(batch) <= chunk:
            return [batch]
        return [batch[i : i + chunk] for i in range(0, len(batch), chunk)]

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
                self.check_batch(b)
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
                yield self.check_logits(b, outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0))

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
                self._settle(req)

    def _settle(self, req: _Request) -> None:
        """Wait for an abandoned request, then release its slot (retired unless the request succeeded)."""
        ok = False
        if req.future is not None:
            try:
                req.future.result(timeout=self.timeout_s + 5.0)
                ok = True
            except Exception as exc:  # nobody wants this result; its failure only decides the slot's fate
                log.debug("an abandoned request to %s ended with: %s", self._where(), exc)
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
                if retry.is_transient(exc) and req.attempt < self.retries:
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
                    if not (retry.is_transient(exc) and attempt < self.retries):
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

    def _request_tensors(self, batch: np.ndarray, slot: ShmSlot | None) -> tuple[list[Any], list[Any]]:
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

    def _read_output(self, result: Any, slot: ShmSlot | None) -> np.ndarray:
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
        delay = retry.backoff_s(attempt)
        log.warning(
            "Triton request to %s failed (%s); retry %d of %d in %.1f s",
            self._where(),
            describe_error(exc),
            attempt + 1,
            self.retries,
            delay,
        )
        time.sleep(delay)
        if retry.server_may_have_restarted(exc):
            # The server may have restarted, possibly with another model: check it again (a mismatch is an
            # error, not something to retry), and register the idle regions with it (it forgot them).
            try:
                self._check_model()
            except BackendUnavailable as down:
                log.debug("still not ready: %s", down)
                return
            if self._shm is not None:
                self._shm.register_idle_again()

    def _failure(self, exc: Exception, attempt: int) -> RunnerError:
        tries = f" after {attempt + 1} attempts" if attempt else ""
        status = retry.grpc_status(exc)
        if status == retry.DEADLINE_STATUS:
            return RunnerError(f"{self._where()} did not answer within {self.timeout_s:g} s{tries}")
        if status == "StatusCode.UNAVAILABLE":
            return BackendUnavailable(f"{self._where()} is unavailable{tries}: {describe_error(exc)}")
        return RunnerError(f"inference on {self._where()} failed{tries}: {describe_error(exc)}")

    # -- description and cleanup -----------------------------------------------------------------------------

    def describe(self) -> str:
        max_batch = self._served.max_batch_size if self._served else "?"
        shm = f" shm={self.shared_memory}" if self.shared_memory != "none" else ""
        return (
            f"triton {self.url} model={self.model_name} v{self._served_version} "
            f"platform={self._platform} max_batch={max_batch} in_flight={self.max_in_flight}{shm}"
        )

    def close(self) -> None:
        """Unregister and free shared-memory regions and close the channel; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._shm is not None:
            self._shm.close()
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # closing a channel to a dead server must not mask the real error
                log.debug("closing the gRPC channel to %s failed: %s", self.url, exc)


class _Request:
    """One chunk on its way: the slot it holds, the future its callback completes, and its attempt."""

    __slots__ = ("batch", "slot", "future", "context", "attempt")

    def __init__(self, batch: np.ndarray):
        self.batch = batch
        self.slot: ShmSlot | None = None
        self.future: Future | None = None
        self.context: Any = None
        self.attempt = 0
