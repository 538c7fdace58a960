"""Test-only fork audit: with this folder on PYTHONPATH and RETRAIN_FORK_AUDIT naming a file, every
`os.fork()` in any Python process of the run (ranks, fork servers, loader workers) appends one JSON
line to that file: the forking pid, its command line and how many OS threads it had at that moment.

A fork with more than one thread is the hazard behind the DataLoader deadlock: the child gets only
the forking thread, and a lock another thread held (the interpreter's, the allocator's, a queue's)
stays held forever. Counting OS threads (not Python's) also catches the process group's C++ threads.
`subprocess` is not recorded: it execs straight after its fork (and calls no at-fork hooks).
"""

import os

_AUDIT_FILE = os.environ.get("RETRAIN_FORK_AUDIT")

if _AUDIT_FILE:
    import json

    def _record_fork() -> None:
        try:
            tasks = os.listdir("/proc/self/task")
            names = []
            for task in tasks:
                try:
                    with open(f"/proc/self/task/{task}/comm") as comm:
                        names.append(comm.read().strip())
                except OSError:
                    names.append("?")
            with open("/proc/self/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            line = json.dumps({"pid": os.getpid(), "threads": len(tasks), "thread_names": sorted(names), "cmdline": cmdline[:300]})
            # One write of one short line to an O_APPEND file: lines from concurrent processes do not interleave.
            fd = os.open(_AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        except Exception:  # never break the program under audit; a missing line fails the test's count instead
            pass

    os.register_at_fork(before=_record_fork)
