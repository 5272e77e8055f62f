"""The ledger's concurrent-writer load, shared by its file-root and S3-root tests."""

from __future__ import annotations

import threading

from pipeline import ledger


def write_concurrently(model: str, writers: int, moves: int, timeout: float = 60) -> None:
    """``writers`` threads, each appending ``moves`` promotions (run keys ``w<w>-<i>``) at
    once; returns when all have finished."""

    def writer(w: int) -> None:
        for i in range(moves):
            ledger.append(
                model,
                from_version=None,
                to_version=str(w),
                action="promote",
                who=f"writer-{w}",
                why=f"move {i}",
                run_key=f"w{w}-{i}",
            )

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), f"a ledger writer still runs after {timeout} s"
