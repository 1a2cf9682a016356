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


def slow_start(seconds):
    """An init that takes a while (a worker importing and setting up), then returns no state."""
    time.sleep(seconds)


def broken_start():
    """An init that kills its process: a worker that can never start."""
    os._exit(3)


def nap(state, seconds):
    time.sleep(seconds)
    return os.getpid()
