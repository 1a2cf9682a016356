"""Functions the worker-pool tests run in worker processes (importable: forkserver workers
receive functions by reference)."""

import os
import signal
import time


def work(state, x):
    if x == "hang":
        time.sleep(1e6)
    if x == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if x == "bad":
        raise ValueError("bad thing\nsecond line")
    return os.getpid(), x
