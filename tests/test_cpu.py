"""sdlora.cpu: the launcher's thread count leaves out the cores other processes are using."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from sdlora.cpu import free_cores, running_elsewhere, usable_cores


def test_free_cores_leave_out_processes_running_elsewhere():
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        seen = max(running_elsewhere() for _ in range(20))
        free = min(free_cores() for _ in range(20))
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert seen >= 2  # the two busy loops, read from /proc/loadavg's running count
    assert usable_cores() == len(os.sched_getaffinity(0))
    assert 1 <= free < usable_cores() or usable_cores() == 1  # the busy cores are not offered
