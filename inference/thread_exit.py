"""Wait for a joined thread's OS thread to be gone, so MLX can never abort the process at exit.

`Thread.join` returns when Python is done with the thread; the OS thread then still runs its
C++ thread-local destructors. MLX 0.32 keeps a compile cache per thread (any thread that ran
an `mx.compile`d function, e.g. mlx-lm's SwiGLU) whose destructor takes the GIL to release
Python functions; if the main thread has begun finalizing by then, taking the GIL ends the
thread inside the destructor and the process aborts ("terminate called without an active
exception", exit status 134) after all its work is done. Seen in about half the runs of a
script that closes an Engine and exits. Waiting here closes that window.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

MAX_WAIT_S = 2.0  # a thread's destructors take microseconds; this only bounds a stuck one


def wait_os_thread_exit(thread: threading.Thread, timeout_s: float = MAX_WAIT_S) -> bool:
    """After `thread.join()`: wait until its OS thread has exited; False on timeout.

    Linux only (reads /proc/self/task); elsewhere returns True at once.
    """
    native_id = thread.native_id
    task = Path(f"/proc/{os.getpid()}/task/{native_id}")
    if native_id is None or not task.parent.is_dir():
        return True
    deadline = time.monotonic() + timeout_s
    while task.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True
