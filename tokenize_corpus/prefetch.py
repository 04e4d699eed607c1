"""Run an iterator a few items ahead in a background thread (stage 2: decode overlaps encode)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

_DONE = object()


def prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Yield ``items`` in order, produced by a background thread up to ``depth`` items ahead.

    PIL decoding and resizing release the GIL, so the producer overlaps with the tokenizer's
    forward pass in the consumer. Exceptions in the thread are re-raised here, in order; leaving
    the loop early stops the thread.
    """
    buffer: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(("done", _DONE))
        except BaseException as err:  # handed to the consumer, which re-raises it
            buffer.put(("error", err))

    thread = threading.Thread(target=produce, name="decode-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)
