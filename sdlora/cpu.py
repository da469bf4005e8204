"""How many CPU threads a training process should ask OpenMP for: the cores this process may use that are
not busy with other work right now.

More threads than free cores makes a step many times slower (measured: bench/bench_threads.py, and
docs/benchmarks.md): OpenMP's threads spin at each barrier waiting for one another, and a thread whose core
is taken by another process holds every other one up. `python -m sdlora.cpu` prints the count for the
launcher (no torch import: it answers in milliseconds).
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's limit included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def running_elsewhere() -> int:
    """Processes running on the machine right now, this one left out (/proc/loadavg's running count: the
    load average itself lags by a minute)."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


def free_cores() -> int:
    """Usable cores not busy with other processes, at least 1."""
    return max(1, usable_cores() - running_elsewhere())


def main() -> None:
    print(free_cores())


if __name__ == "__main__":
    main()
