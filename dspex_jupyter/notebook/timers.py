"""Background timers for widgets: coalesced redraws and periodic refreshes.

Run events arrive on the manager's event-loop thread, sometimes thousands a second; a
widget that redrew on each would flood the browser. ``CoalescedRedraw`` turns any number
of "something changed" signals into at most one redraw per interval, and always draws the
last state. ``PeriodicRefresh`` calls a function every few seconds until stopped (RSS and
GPU memory change without events). Both use one daemon thread and never block the caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("dspex_jupyter.notebook")

# A redraw thread with nothing to do for this long ends; the next request starts another.
IDLE_EXIT_S = 30.0


class CoalescedRedraw:
    """Calls ``draw()`` on a background thread at most once per ``min_interval`` seconds,
    after ``request()``; a request made during a draw causes one more draw, so the final
    state is always drawn."""

    def __init__(
        self, draw: Callable[[], None], *, min_interval: float = 0.1, name: str = "dspex-redraw"
    ) -> None:
        self._draw = draw
        self.min_interval = min_interval
        self._name = name
        self._cond = threading.Condition()
        self._draw_lock = threading.Lock()  # one draw at a time (thread or draw_now)
        self._dirty = False
        self._drawing = 0  # draws in progress
        self._closed = False
        self._thread: threading.Thread | None = None
        self._last_draw = float("-inf")
        self.redraw_count = 0

    def request(self) -> None:
        """Note that the state changed (cheap; callable from any thread)."""
        with self._cond:
            if self._closed:
                return
            if self._dirty:
                return  # already scheduled: coalesced
            self._dirty = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def draw_now(self) -> None:
        """Draw synchronously on the calling thread (first paint, tests)."""
        with self._cond:
            self._dirty = False
            self._drawing += 1
        self._run_draw()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every requested redraw has been drawn; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._dirty and not self._drawing, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run_draw(self) -> None:
        try:
            with self._draw_lock:
                self._draw()
        except Exception:  # a failing draw must not kill the thread or the caller
            logger.exception("dspex widget redraw failed")
        finally:
            with self._cond:
                self._drawing -= 1
                self._last_draw = time.monotonic()
                self.redraw_count += 1
                self._cond.notify_all()

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._dirty and not self._closed:
                    if not self._cond.wait(IDLE_EXIT_S) and not self._dirty:
                        self._thread = None
                        return
                # Throttle: wait out the rest of the interval since the last draw.
                while not self._closed:
                    remaining = self._last_draw + self.min_interval - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._closed:
                    self._thread = None
                    self._dirty = False
                    self._cond.notify_all()
                    return
                self._dirty = False
                self._drawing += 1
            self._run_draw()


class PeriodicRefresh:
    """Calls ``refresh()`` every ``interval`` seconds on a daemon thread until ``stop()``."""

    def __init__(
        self, refresh: Callable[[], None], interval: float, name: str = "dspex-refresh"
    ) -> None:
        self._refresh = refresh
        self.interval = interval
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _main(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._refresh()
            except Exception:
                logger.exception("dspex periodic refresh failed")


class RefreshedWhileShown:
    """Mixin for a widget whose ``timer`` (a ``PeriodicRefresh``) should run while it is
    displayed: started by the display, stopped by ``close()``."""

    timer: PeriodicRefresh

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        self.timer.start()
        return super()._repr_mimebundle_(**kwargs)

    def close(self) -> None:
        self.timer.stop()
        super().close()
