"""The handoff: staged slots go from the capturing process to its writer process, and come back free.

``WriterProcess`` starts ``python -m engine.writer`` (a fresh interpreter: never a fork of a process that may
have initialised CUDA, and it never imports the caller's ``__main__``), passes it one end of a socket and the
store's lock, and sends it the ``WriterSpec``. See ``engine.writer.protocol`` for the messages and the
shutdown protocol.

On CPU the forward thread sends each batch itself once its last point is staged (the copies are
synchronous). On CUDA a small handoff thread waits on each batch's event (``synchronize`` releases the GIL,
and the event sleeps instead of spinning a core) and sends it: the forward thread never waits for a copy (the
batch's device snapshots are dropped on the forward thread when the slot comes back). A batch whose copies
the thread has waited on for ``_EXIT_WAIT_S`` (a hung device) fails the run at the forward thread's next
wait (backpressure, flush, drain) or forward, instead of leaving it waiting for ever. Flush messages travel
behind the batches, in order, the same way; at close the handoff thread forwards what it holds and ends
first, and the close message goes after it, saying the run failed if the thread did (the batches behind its
failure were never sent).

The forward thread reads what comes back (free slots, committed totals, errors) without blocking, at every
forward; it blocks only when every slot is in use (backpressure), and then at most ``_LIVENESS_CHECK_S`` at a
time between checks that the writer process is alive: a dead writer process is reported within a second.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import warnings

import torch

from engine.capture.staging import Slot, SlotPool
from engine.errors import CaptureError
from engine.writer.channel import ChannelClosed, channel_pair
from engine.writer.protocol import (
    Batch,
    Buffer,
    Close,
    Closed,
    Dims,
    Failure,
    Flush,
    Flushed,
    Free,
    NonFinite,
    Totals,
    ToWriter,
    WriterSpec,
)

_LIVENESS_CHECK_S = 0.05
_EXIT_WAIT_S = 30.0


class HandoffStuck(RuntimeError):
    """The handoff thread still waited on a batch's copies after ``_EXIT_WAIT_S`` (a hung device)."""

    def __init__(self, message: str | None = None):
        super().__init__(message or f"a batch's copies did not finish in {_EXIT_WAIT_S:.0f} s")


class Progress:
    """What the writer process has reported. Thread safety: written by the thread that reads the channel,
    read from any thread (each field is replaced whole)."""

    def __init__(self, tokens: int = 0, chunks: int = 0):
        self.tokens_committed = tokens
        self.bytes_committed = 0
        self.chunks_committed = chunks
        self.submitted = 0
        self.in_flight_high_water = 0


# The writer process's parallelism is its writer threads: numpy's BLAS calls there (the statistics' row norms
# and column sums) run on the calling thread, because a BLAS thread pool spins between calls and took more CPU
# than the calls saved (benchmarks/results/cpu-2026-12-07-cpu-per-byte/statistics_kernels.txt).
_ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _child_environment() -> dict[str, str]:
    """The parent's environment plus its import path, so the child imports the same ``engine`` (and the same
    test or benchmark modules naming a sink), with one BLAS thread."""
    paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), **_ONE_BLAS_THREAD}


class WriterProcess:
    """The capturing process's end of the writer process.

    Args:
        spec: what the writer process writes.
        pool: the slot pool (slots come back to it).
        cuda_device: the model's GPU: batches wait on their CUDA event in the handoff thread (which makes it
            its current device, so that it uses the model's CUDA context, not one of its own on GPU 0)
            before they are sent; None on CPU.
        lock_fd: the store lock's descriptor (the writer process holds the lock too), or None.

    Thread safety: ``submit``, ``poll``, ``acquire``, ``flush`` and ``close`` from the forward thread;
    ``stop`` and ``progress`` from any thread.
    """

    def __init__(self, spec: WriterSpec, pool: SlotPool, cuda_device: torch.device | None,
                 lock_fd: int | None):
        self._pool = pool
        self._channel, theirs = channel_pair()
        fds = (theirs.fileno(),) + ((lock_fd,) if lock_fd is not None else ())
        try:
            # A session of its own: Ctrl-C at the terminal reaches the capturing process only, which closes
            # the writer process in order (and it exits by itself if its parent dies).
            self._process = subprocess.Popen(
                [sys.executable, "-P", "-m", "engine.writer", str(theirs.fileno())], pass_fds=fds,
                stdin=subprocess.DEVNULL, env=_child_environment(), start_new_session=True)
        finally:
            theirs.close()
        full_chunks = spec.start_row // spec.chunk_tokens
        self.progress = Progress(full_chunks * spec.chunk_tokens, full_chunks)
        self._error: CaptureError | None = None
        self.error_delivered = False
        self._receive_lock = threading.Lock()
        self._channel_closed = False
        self._flush_requests = 0
        self._flushed = 0
        self._dead = False
        self._closed_reply: Closed | None = None
        self._handoff: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._waiting_since: float | None = None  # when the handoff thread began waiting on a batch's copies
        self._handoff_stopped = False
        try:
            self._channel.send(spec)
            if cuda_device is not None:
                self._handoff = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._forward_batches, args=(cuda_device,),
                                                name="actcap-handoff", daemon=True)
                self._thread.start()
        except BaseException:
            self.abort()
            raise

    # ---- sending -------------------------------------------------------------------------------
    def announce(self, slot: Slot) -> None:
        """Hand the writer process the slot buffers it has not seen (new or grown)."""
        for name in slot.unannounced:
            buffer = slot.buffers[name]
            self._send(Buffer(slot.index, name, buffer.nbytes), fds=(buffer.fd,))
        slot.unannounced.clear()

    def send_dims(self, dims: dict[str, int]) -> None:
        """The points' widths, once, before the first batch."""
        self._send(Dims(dims))

    def submit(self, slot: Slot) -> None:
        """Hand over a fully staged slot (its buffers announced)."""
        progress = self.progress
        progress.submitted += 1
        in_flight = self._pool.in_flight
        if in_flight > progress.in_flight_high_water:
            progress.in_flight_high_water = in_flight
        message = Batch(slot.index, slot.batch)
        if self._handoff is None:
            self._send(message)
        else:
            self._handoff.put((slot, message))

    def _send(self, message: ToWriter, fds: tuple[int, ...] = ()) -> None:
        """Send now; a writer process that is gone is reported as its death (a CaptureError), not a pipe
        error."""
        try:
            self._channel.send(message, fds)
        except OSError:
            self._died()
            self.check()
            raise

    def _send_in_order(self, message: ToWriter) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._send(message)
        else:
            self._handoff.put((None, message))

    def _forward_batches(self, device: torch.device) -> None:
        """Handoff thread (CUDA): wait for each batch's copies, then send it; flush messages in order; a
        ``threading.Event`` item is set once everything before it is sent (``drain``)."""
        try:
            torch.cuda.set_device(device)
            while (item := self._handoff.get()) is not None:
                slot, message = item
                if isinstance(message, threading.Event):
                    message.set()
                    continue
                if slot is not None:
                    self._waiting_since = time.monotonic()
                    slot.event.synchronize()
                    self._waiting_since = None
                self._channel.send(message)
        except BaseException as exc:  # reported by the forward thread's next check
            self._thread_error = exc

    def drain(self) -> None:
        """CUDA: return once the handoff thread has sent every batch handed to it, so that it waits on no
        event afterwards (a CUDA graph captured in global mode must not see another thread synchronize).
        Costs the caller the wait for the copies in flight (the device itself is not synchronized).

        Raises:
            CaptureError: the run has failed: the handoff thread failed, or still waited on a copy after
                ``_EXIT_WAIT_S`` (it would synchronize inside the caller's block), or the writer process
                failed (as far as its messages have arrived).
        """
        self.check()  # a copy already found stuck is not waited for again
        if self._thread is not None and self._thread.is_alive():
            sent = threading.Event()
            self._handoff.put((None, sent))
            while not sent.wait(_LIVENESS_CHECK_S) and self._thread.is_alive():
                if self._copies_stuck():
                    break
        self.poll()

    def stop(self, error: CaptureError) -> None:
        """Kill the writer process now, from any thread (its store is no longer this run's); the forward
        thread raises ``error`` at its next forward, flush or close. Idempotent."""
        if self._error is None:
            self._error = error  # before the kill: a death seen meanwhile keeps this error (``_died``)
        self._process.kill()

    # ---- receiving -----------------------------------------------------------------------------
    def poll(self) -> None:
        """Take in what the writer process sent, without waiting; raise its failure if it failed or died, or
        if a batch's copies are stuck."""
        self._receive(0.0)
        if self._error is not None or self._thread_error is not None or self._copies_stuck():
            self.check()

    def _copies_stuck(self) -> bool:
        """Whether the handoff thread has waited on one batch's copies for ``_EXIT_WAIT_S``: that is the run's
        failure (``HandoffStuck``), unless the thread failed first."""
        since = self._waiting_since
        if since is not None and time.monotonic() - since > _EXIT_WAIT_S and self._thread_error is None:
            self._thread_error = HandoffStuck()
        return isinstance(self._thread_error, HandoffStuck)

    def check(self) -> None:
        """Raise the writer process's failure (once it has been raised, ``close`` does not raise it again)."""
        self._adopt_thread_error()
        if self._error is not None:
            self.error_delivered = True
            raise self._error

    def _adopt_thread_error(self) -> None:
        """The handoff thread's failure becomes this run's error (unless one came first)."""
        if self._error is None and self._thread_error is not None:
            if isinstance(self._thread_error, OSError):
                self._died()  # the handoff thread could not send: the writer process is gone
            else:
                self._error = CaptureError(f"the handoff thread failed: {self._thread_error!r}")
                self._error.__cause__ = self._thread_error

    def refresh(self) -> None:
        """Take in what the writer process sent, from any thread (``stats``); a failure it reports is raised
        at the forward thread's next forward, flush or close."""
        self._receive(0.0)

    def _receive(self, timeout: float) -> None:
        with self._receive_lock:  # the forward thread, or a thread reading stats
            if self._channel_closed:
                return
            try:
                messages = self._channel.receive(timeout)
            except ChannelClosed:
                self._died()
                return
            for message in messages:
                self._handle(message)

    def _handle(self, message: object) -> None:
        match message:
            case Free():  # once per forward: no capture pattern, whose lookups cost more than the attribute
                self._pool.give_back(message.slot)
            case Totals(tokens, nbytes, chunks):
                self.progress.tokens_committed = tokens
                self.progress.bytes_committed = nbytes
                self.progress.chunks_committed = chunks
            case Flushed(request):
                self._flushed = max(self._flushed, request)
            case NonFinite(key, count):  # the writer pool sends it once per run
                warnings.warn(f"{key}: {count} non-finite values in one chunk (stored as they are, counted "
                              "per chunk in the commit records); if this is float16 overflow, capture with "
                              "dtype='float32' or 'bfloat16'", RuntimeWarning, stacklevel=4)
            case Failure(cause, text) if self._error is None:
                self._error = CaptureError(f"capture writer failed: {cause!r}\n"
                                           f"--- traceback in the writer process ---\n{text}")
                self._error.__cause__ = cause
            case Failure():
                pass  # a later failure: the first one is the run's
            case Closed():
                self._closed_reply = message
            case _:
                raise TypeError(f"the capturing process cannot handle {message!r}: not a message to it")

    def _died(self) -> None:
        """The channel closed without a Closed reply: the writer process is gone."""
        self._dead = True
        if self._error is not None or self._closed_reply is not None:
            return
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        self._error = CaptureError(f"the writer process (pid {self._process.pid}) died ({how}): chunks "
                                   "committed so far are kept; continue with resume=True")

    def _wait(self, done) -> None:
        """Read messages until ``done()``; raise if the writer process fails or dies meanwhile, or a batch's
        copies are stuck (a hung device: backpressure must not wait for ever)."""
        while not done():
            self._copies_stuck()
            self.check()
            self._receive(_LIVENESS_CHECK_S)
        self.check()

    def acquire(self) -> tuple[Slot, float]:
        """A free slot, and the seconds waited for it (backpressure)."""
        slot = self._pool.take()
        if slot is not None:
            return slot, 0.0
        start = time.perf_counter()
        self._wait(lambda: self._pool.free_count > 0)
        return self._pool.take(), time.perf_counter() - start

    def flush(self) -> None:
        """Wait until every submitted batch is in chunk buffers and every full chunk is committed."""
        self._flush_requests += 1
        request = self._flush_requests
        self._send_in_order(Flush(self.progress.submitted, request))
        self._wait(lambda: self._flushed >= request)

    # ---- shutdown ------------------------------------------------------------------------------
    def close(self, failed: bool, sequences: int) -> None:
        """Protocol steps 2-4 (``engine.writer.protocol``); ``finalized`` tells whether the writer process
        published the manifest. Raises the writer's failure unless it was raised before."""
        delivered = self.error_delivered
        try:
            self._stop_handoff()
            self._adopt_thread_error()
            if not self._dead:
                self._send(Close(failed or self._thread_error is not None, sequences))
            while self._closed_reply is None and not self._dead:
                self._receive(_LIVENESS_CHECK_S)
        except CaptureError:  # it was gone before the close message could be sent: raised below
            self.error_delivered = delivered
        finally:
            self._shut_down()
        if self._error is not None and not delivered:
            self.error_delivered = True
            raise self._error

    def _stop_handoff(self) -> None:
        """CUDA: let the handoff thread send every batch it holds, and end (once; later calls return). A
        thread still waiting after _EXIT_WAIT_S (a device that never finishes a copy) is left behind and
        counted as failed: the run's close says so, and ``copies_stuck`` tells to keep its slots mapped."""
        if self._thread is None or self._handoff_stopped:
            return
        self._handoff_stopped = True
        self._handoff.put(None)
        self._thread.join(timeout=0 if isinstance(self._thread_error, HandoffStuck) else _EXIT_WAIT_S)
        if self._thread.is_alive() and self._thread_error is None:
            self._thread_error = HandoffStuck()

    @property
    def copies_stuck(self) -> bool:
        """The handoff thread was left waiting on a copy at close: its slot may still be written."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def finalized(self) -> bool:
        """The writer process published the final manifest."""
        return self._closed_reply is not None and self._closed_reply.finalized

    @property
    def error(self) -> CaptureError | None:
        return self._error

    def _shut_down(self) -> None:
        self._stop_handoff()
        try:
            self._process.wait(timeout=_EXIT_WAIT_S if self._closed_reply is not None else 1)
        except BaseException:  # too slow, or a second Ctrl-C: nothing may outlive close()
            self._process.kill()
            self._process.wait()
            if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                raise
        finally:
            self._close_channel()

    def _close_channel(self) -> None:
        with self._receive_lock:
            self._channel_closed = True
            self._channel.close()

    def abort(self) -> None:
        """Stop without draining (a failed construction): the writer process exits as its channel closes."""
        self._stop_handoff()
        self._close_channel()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
