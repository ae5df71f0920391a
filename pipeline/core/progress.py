"""Progress reporting for long work: tqdm bars, or nothing (quiet), or JSON lines (batch)."""

from __future__ import annotations

import json
import sys
import time

from tqdm import tqdm


def progress_printer(mode: str = "bar"):
    """A ``(what, done, total)`` callback: ``bar`` (tqdm on stderr), ``json`` or ``quiet``."""
    if mode == "quiet":
        return None
    if mode == "json":

        def emit(what, done, total):
            print(
                json.dumps(
                    {
                        "time": time.time(),
                        "event": "progress",
                        "what": what,
                        "done": done,
                        "total": total,
                    }
                ),
                file=sys.stderr,
                flush=True,
            )

        return emit
    bar = None

    def update(what, done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="measure layers", unit="layer", file=sys.stderr)
        if done == 0:
            bar.write(what)
            return
        bar.set_postfix_str(what[-40:])
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update
