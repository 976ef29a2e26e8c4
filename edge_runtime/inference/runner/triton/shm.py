"""System shared memory for Triton requests: tensors pass through ``/dev/shm`` instead of the gRPC message.

Works only when the server runs on this host (it maps the same ``/dev/shm`` files). A *slot* is one input and
one output region, registered with the server under the slot's names; each request in flight holds one slot.
The pool makes its slots up front, so a server that cannot map them fails at construction, not at the first
series. A slot whose request failed is retired, never reused: the server may still be writing into it.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import uuid
from typing import Any

import numpy as np

from edge_runtime.errors import BackendUnavailable, RunnerError
from edge_runtime.inference.runner.triton.retry import describe_error

log = logging.getLogger(__name__)


class ShmSlot:
    """One input and one output system shared-memory region, registered with the server.

    ``client`` is the runner's ``tritonclient.grpc.InferenceServerClient``, ``url`` names the server in
    messages and ``headers`` go with every call (an access token when the server restricts this API).
    """

    def __init__(self, tag: str, *, client: Any, url: str, headers: dict[str, str] | None):
        from tritonclient.utils import InferenceServerException, shared_memory

        self._shm = shared_memory
        self._error_type = InferenceServerException
        self._client = client
        self.url = url
        self.headers = headers
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
        """Register both regions with the server. ``force`` (after a possible server restart) drops what the
        server may still hold under these names first, and only warns when registering fails: the retry that
        follows reports the failure."""
        try:
            if force:
                for name in (self.in_name, self.out_name):
                    self._unregister(name)
            self._client.register_system_shared_memory(
                self.in_name, self.in_key, self.in_bytes, headers=self.headers, client_timeout=10.0
            )
            self._client.register_system_shared_memory(
                self.out_name, self.out_key, self.out_bytes, headers=self.headers, client_timeout=10.0
            )
        except self._error_type as exc:
            if force:
                log.warning("re-registering shared memory with %s failed: %s", self.url, describe_error(exc))
                return
            raise BackendUnavailable(
                f"Triton at {self.url} cannot use system shared memory ({describe_error(exc)}); "
                "it works only when the server shares this host's /dev/shm (and, if the server restricts "
                "its shared-memory API, with the access header); use shared_memory='none' otherwise"
            ) from exc
        self.registered = True

    def _unregister(self, name: str) -> None:
        try:
            self._client.unregister_system_shared_memory(name, headers=self.headers, client_timeout=5.0)
        except Exception as exc:  # a restarted server never had it, a gone one cannot answer: nothing to undo
            log.debug("unregistering %s from %s failed: %s", name, self.url, exc)

    def write(self, batch: np.ndarray) -> None:
        self._shm.set_shared_memory_region(self.in_handle, [batch])

    def read(self, shape: tuple[int, ...]) -> np.ndarray:
        """A copy of the float32 output of ``shape``: the region is reused by the next request."""
        nbytes = int(np.prod(shape)) * 4
        if nbytes > self.out_bytes:
            raise RunnerError(f"the output {shape} does not fit the shared-memory region ({self.out_bytes} bytes)")
        view = self._shm.get_contents_as_numpy(self.out_handle, np.float32, shape)
        out = np.array(view, copy=True)
        del view
        return out

    def destroy(self) -> None:
        """Unregister the regions (best effort: the server may be gone) and free them here regardless."""
        if self.registered:
            for name in (self.in_name, self.out_name):
                self._unregister(name)
            self.registered = False
        for attr in ("in_handle", "out_handle"):
            handle = getattr(self, attr)
            if handle is not None:
                try:
                    self._shm.destroy_shared_memory_region(handle)
                except Exception as exc:
                    log.debug("freeing shared memory failed: %s", exc)
                setattr(self, attr, None)


class ShmPool:
    """Up to ``size`` slots of at least ``in_bytes``/``out_bytes``, one per request in flight, made up front.

    ``take`` and ``release`` may be called from the thread that collects results while another submits.
    """

    def __init__(
        self,
        client: Any,
        *,
        url: str,
        headers: dict[str, str] | None,
        size: int,
        in_bytes: int,
        out_bytes: int,
    ):
        self._client = client
        self.url = url
        self.headers = headers
        self.size = size
        self.region_bytes = (in_bytes, out_bytes)
        self.slots: list[ShmSlot] = []
        self._free: collections.deque[ShmSlot] = collections.deque()
        self._lock = threading.Lock()
        self.closed = False
        try:
            for _ in range(size):  # up front, so a server that cannot map them fails here
                self._free.append(self._new_slot())
        except BaseException:
            self.close()
            raise

    def _new_slot(self) -> ShmSlot:
        tag = f"edge-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        slot = ShmSlot(tag, client=self._client, url=self.url, headers=self.headers)
        self.slots.append(slot)
        try:
            slot.ensure(*self.region_bytes)
        except BaseException:
            self.slots.remove(slot)
            slot.destroy()
            raise
        return slot

    def take(self) -> ShmSlot | None:
        """A free slot; None (send over gRPC instead) when all are in use or a new one cannot be made."""
        if self.closed:
            return None
        with self._lock:
            if self._free:
                return self._free.popleft()
            if len(self.slots) >= self.size:
                return None
        try:
            return self._new_slot()  # replaces a slot retired after a failed request
        except RunnerError as exc:
            log.warning("no shared memory for this request, sending it over gRPC: %s", exc)
            return None

    def release(self, slot: ShmSlot | None, ok: bool) -> None:
        """Return a slot after its request completed; after a failure retire it instead, since the
        server may still be writing into its output region."""
        if slot is None:
            return
        if ok and not self.closed:
            with self._lock:
                self._free.append(slot)
            return
        with self._lock:
            if slot in self.slots:
                self.slots.remove(slot)
        slot.destroy()

    def register_idle_again(self) -> None:
        """After a possible server restart: the new server knows none of our regions."""
        with self._lock:
            idle = list(self._free)
        for slot in idle:
            slot.register(force=True)

    def close(self) -> None:
        """Unregister and free every region; later releases free their slot instead of keeping it."""
        self.closed = True
        for slot in self.slots:
            slot.destroy()
        self.slots.clear()
        self._free.clear()
