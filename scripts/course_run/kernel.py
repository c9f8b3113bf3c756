"""Execute one notebook headless, the way ``make run`` needs it.

* the kernel talks over IPC (Unix sockets) where the platform has them, so it prints no transport warning;
  its own output (the kernel process's stdout/stderr) goes to a log that ``kernel_messages`` filters;
* ``events`` hears which cell starts, every stream text and every tqdm bar update (tqdm draws its bars as
  ipywidgets; nbclient keeps their state, ``widgets.progress_bar_text`` turns it into a line);
* Ctrl-C (recorded by a SIGINT handler while a notebook runs) interrupts the kernel, stops before the next cell and saves
  the executed copy up to that cell; a second Ctrl-C shuts the kernel down at once.
"""
from __future__ import annotations

import asyncio
import atexit
import os
import re
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nbformat
from jupyter_core.paths import jupyter_runtime_dir
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from traitlets.config import Config

from course_run.widgets import WIDGET_VIEW, progress_bar_text

HARMLESS_KERNEL_LINES = (
    # ipykernel warns on every start over TCP. A kernel started here listens on 127.0.0.1 only, and every
    # message is signed with a key from a connection file only this user can read: nothing crosses the
    # network. IPC (no warning) is used wherever the platform has it; this covers the TCP fallback (Windows).
    "Kernel is running over TCP without encryption",
)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
UNIX_SOCKET_PATH_MAX = 100  # bytes: sun_path is 104 on macOS, 108 on Linux; keep a margin
RUN_INFO_KEY = "course_run"  # executed notebook metadata written by `make run`
INTERRUPT_AGAIN_S = 3.0  # after Ctrl-C, interrupt the kernel again this often until the notebook stops


class Events(Protocol):
    """What a running notebook reports (``progress.Progress`` implements it)."""

    def cell_started(self, index: int) -> None: ...
    def bar(self, text: str) -> None: ...
    def stream(self, name: str, text: str) -> None: ...
    def tick(self) -> None: ...
    def interrupting(self, presses: int) -> None: ...


@dataclass
class Outcome:
    """How one notebook ended."""

    status: str  # "ok", "failed" or "interrupted"
    seconds: float
    cell_index: int | None = None  # the cell that failed or was running when interrupted
    ename: str = ""  # the exception's name, e.g. "DownloadError"
    evalue: str = ""  # its message
    traceback: str = ""  # plain text, colours removed
    kernel_messages: list[str] = field(default_factory=list)

    @property
    def headline(self) -> str:
        """``DownloadError: Could not download model.safetensors. Tried:`` (first line), or ""."""
        first = self.evalue.strip().splitlines()[0] if self.evalue.strip() else ""
        return f"{self.ename}: {first}" if first else self.ename


class NotebookInterrupted(Exception):
    """Raised between cells once Ctrl-C was pressed."""


def kernel_connection(transport: str | None = None) -> dict[str, str]:
    """How the kernel and this process talk: IPC (Unix sockets) where they exist and their path fits, else TCP.

    The sockets get an absolute path in Jupyter's runtime folder: the kernel runs in the notebook's folder,
    so a relative one would not be the same file for both sides.
    """
    sockets = Path(jupyter_runtime_dir()) / f"kernel-{uuid.uuid4()}-ipc"  # jupyter_client appends -<n>
    fits = len(os.fsencode(sockets)) + len("-65535") < UNIX_SOCKET_PATH_MAX
    if (transport or ("tcp" if os.name == "nt" or not fits else "ipc")) == "tcp":
        return {"transport": "tcp"}
    sockets.parent.mkdir(parents=True, exist_ok=True)
    return {"transport": "ipc", "ip": str(sockets)}


def kernel_messages(log: str) -> list[str]:
    """The kernel process's own output lines worth showing (the harmless transport warning removed)."""
    return [line.rstrip() for line in log.splitlines()
            if line.strip() and not any(harmless in line for harmless in HARMLESS_KERNEL_LINES)]


def plain_text(text: str) -> str:
    """Terminal colours removed."""
    return ANSI.sub("", text)


class ObservedClient(NotebookClient):
    """nbclient's client, telling ``events`` what happens and stopping between cells on request."""

    def __init__(self, nb: nbformat.NotebookNode, events: Events, **kwargs: Any) -> None:
        super().__init__(nb, **kwargs)
        self.events = events
        self.stop_requested = False
        self.current_cell: int | None = None

    async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
        if self.stop_requested:
            raise NotebookInterrupted(cell_index)
        if cell.cell_type == "code" and cell.source.strip():
            self.current_cell = cell_index
            self.events.cell_started(cell_index)
        return await super().async_execute_cell(cell, cell_index, execution_count, store_history)

    def process_message(self, msg, cell, cell_index):
        try:
            return super().process_message(msg, cell, cell_index)
        finally:  # after nbclient updated its widget state (it raises when the cell is done)
            self._observe(msg)

    def _observe(self, msg: dict[str, Any]) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            self.events.stream(content.get("name", "stdout"), content.get("text", ""))
        elif kind == "comm_close":
            self._forget_widget(content.get("comm_id", ""))
        elif kind in ("comm_open", "comm_msg"):
            text = progress_bar_text(self.widget_state, content.get("comm_id", ""))
            if text:
                self.events.bar(text)

    def _forget_widget(self, model_id: str) -> None:
        """A closed widget (tqdm with ``leave=False``) disappears from the page, as in Jupyter."""
        self.widget_state.pop(model_id, None)
        for cell in self.nb.cells:
            if cell.cell_type == "code":
                cell.outputs = [out for out in cell.outputs
                                if out.get("data", {}).get(WIDGET_VIEW, {}).get("model_id") != model_id]

    async def interrupt(self, now: bool = False) -> None:
        """Ctrl-C for the kernel (``now``: shut it down)."""
        if self.km is not None and self.km.has_kernel:
            await (self.km.shutdown_kernel(now=True) if now else self.km.interrupt_kernel())


def _error_outcome(error: BaseException, seconds: float, cell: int | None, interrupted: bool) -> Outcome:
    if interrupted:  # however the kernel stopped: KeyboardInterrupt in the cell, or shut down
        return Outcome("interrupted", seconds, cell, "KeyboardInterrupt", "stopped by Ctrl-C")
    if isinstance(error, CellExecutionError):
        return Outcome("failed", seconds, cell, error.ename, error.evalue, plain_text(error.traceback))
    return Outcome("failed", seconds, cell, type(error).__name__, str(error))


def execute_notebook(source: Path, target: Path, events: Events, *, run_info: dict[str, Any],
                     verbose: bool = False, transport: str | None = None) -> Outcome:
    """Run ``source`` with its folder as working directory; write the executed copy to ``target``.

    The copy is written however the run ends (with the error, or up to the interrupted cell), under a
    temporary name first, and carries ``run_info`` plus status and seconds in ``metadata.course_run``.
    """
    notebook = nbformat.read(source, as_version=4)
    client = ObservedClient(notebook, events, timeout=None, kernel_name="python3",
                            resources={"metadata": {"path": str(source.parent)}},
                            config=Config({"KernelManager": kernel_connection(transport)}))
    loop = asyncio.new_event_loop()
    failure: list[BaseException] = []
    with tempfile.TemporaryFile() as log:
        output = {} if verbose else {"stdout": log, "stderr": log}  # the kernel process's own output

        done = threading.Event()

        def work() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(client.async_execute(**output))
            except BaseException as error:  # reported to the main thread
                failure.append(error)
            finally:
                done.set()

        start = time.perf_counter()
        threading.Thread(target=work, name=f"run {source.name}", daemon=True).start()
        _wait(done, client, loop, events)
        seconds = time.perf_counter() - start
        log.seek(0)
        messages = kernel_messages(log.read().decode("utf-8", "replace"))
    _close(client, loop)

    if failure:
        outcome = _error_outcome(failure[0], seconds, client.current_cell, client.stop_requested)
    else:  # also when Ctrl-C came while the last cell ran and it finished anyway
        outcome = Outcome("ok", seconds)
    outcome.kernel_messages = messages
    client.set_widgets_metadata()
    notebook.metadata[RUN_INFO_KEY] = {**run_info, "status": outcome.status, "seconds": round(seconds, 2),
                                       "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "stopped_at_cell": outcome.cell_index, "error": outcome.headline}
    write_atomically(notebook, target)
    return outcome


def _wait(done: threading.Event, client: ObservedClient, loop: asyncio.AbstractEventLoop,
          events: Events) -> None:
    """Wait for the notebook, refreshing the progress line; turn Ctrl-C into a kernel interrupt.

    The interrupt is sent again every few seconds until the notebook stops: one that reaches the kernel
    just before a cell starts is ignored. Ctrl-C only records a press here: a KeyboardInterrupt raised inside
    ``done.wait`` can leave the Event's lock held, and the notebook's thread then hangs in ``done.set()``.
    (An Event, not Thread.join: a join interrupted by Ctrl-C can report a live thread as finished.)
    """
    pressed: list[int] = []  # Ctrl-C presses not yet handled
    main = threading.current_thread() is threading.main_thread()  # only there can a signal handler be set
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum)) if main else None
    presses, last_sent = 0, 0.0
    try:
        while not done.is_set():
            done.wait(0.5)
            events.tick()
            if pressed:
                new = len(pressed)
                del pressed[:new]
                presses += new
                client.stop_requested = True
                events.interrupting(presses)
                last_sent = 0.0  # send it now
            if presses and time.monotonic() - last_sent >= INTERRUPT_AGAIN_S:
                last_sent = time.monotonic()
                _send(client.interrupt(now=presses > 1), loop)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _send(coroutine: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Run ``coroutine`` on the notebook's event loop (nothing when that loop has finished)."""
    try:
        asyncio.run_coroutine_threadsafe(coroutine, loop)
    except RuntimeError:
        coroutine.close()


def _close(client: ObservedClient, loop: asyncio.AbstractEventLoop) -> None:
    """Shut down a kernel left running (when it failed to start) and drop nbclient's exit hook for it."""
    atexit.unregister(client._cleanup_kernel)  # nbclient leaves it registered when the start fails
    if client.km is not None and client.km.has_kernel:
        loop.run_until_complete(client.km.shutdown_kernel(now=True))
    loop.close()


def write_atomically(notebook: nbformat.NotebookNode, target: Path) -> None:
    """Write under a temporary name, then rename: never a half-written executed copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    nbformat.write(notebook, tmp)
    tmp.replace(target)
