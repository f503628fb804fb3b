"""One lazy loader for the compiled extensions (the fused CPU loops and the CUDA kernels).

An :class:`Extension` is built and loaded the first time it is asked for, once per process,
under a lock. When it cannot be (switched off by its environment variable, no compiler, no
device, a failed build) :meth:`Extension.get` returns None, one log line says why, and the
compress layer runs the torch reference instead.
"""

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("ddp_hooks")


class Extension:
    """``build()`` returns the loaded module (or raises); ``why_not()`` a reason to skip it."""

    def __init__(self, label: str, switch: str, build: Callable[[], Any], why_not: Callable[[], str | None]) -> None:
        self.label = label
        self.switch = switch
        self._build = build
        self._why_not = why_not
        self._lock = threading.Lock()
        self._tried = False
        self._module: Any = None
        self.reason: str | None = None

    def get(self) -> Any:
        """The loaded module, or None (the torch reference is used; logged once)."""
        if self._tried:
            return self._module
        with self._lock:
            if self._tried:
                return self._module
            reason = f"{self.switch}=1" if os.environ.get(self.switch) == "1" else self._why_not()
            if reason is None:
                try:
                    self._module = self._build()
                except Exception as exc:  # noqa: BLE001 - any build problem falls back to torch
                    text = str(exc).strip()
                    reason = "build failed: " + (text.splitlines()[0] if text else type(exc).__name__)
            self.reason = reason
            if reason is not None:
                log.info("ddp_hooks: %s off (%s); using the torch reference", self.label, reason)
            self._tried = True
            return self._module

    def available(self) -> bool:
        return self.get() is not None

    def status(self) -> str:
        """'loaded', or why the extension is not used."""
        return "loaded" if self.available() else f"off: {self.reason or 'disabled'}"

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside, the torch reference is used (for comparisons and benchmarks)."""
        self.get()
        module, self._module = self._module, None
        try:
            yield
        finally:
            self._module = module
