"""Helper of test_store's SIGKILL test (not a test module): ``python store_child.py DB``.

Submits workloads to the store at DB as fast as it can from four threads and
prints each id on its own line, flushed, once ``submit_workload`` has returned
for it, until it is killed.
"""

from __future__ import annotations

import sys
import threading

from server.store import Store


def main(path: str) -> None:
    store = Store(path)
    lock = threading.Lock()

    def submit(thread: int) -> None:
        for i in range(10**9):
            id = f"t{thread}-{i:07d}"
            store.submit_workload(
                id, "research", "training", {"id": id, "training": {"gpus": 1}}, request_key=id
            )
            with lock:
                sys.stdout.write(id + "\n")
                sys.stdout.flush()

    threads = [threading.Thread(target=submit, args=(t,), daemon=True) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main(sys.argv[1])
