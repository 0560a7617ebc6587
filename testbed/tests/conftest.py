"""What the bed's own test files share: starting one bed.py and stopping it."""

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BED_PY = os.path.join(REPO, "testbed", "bed.py")


@contextlib.contextmanager
def running_bed(*options):
    """A bed.py process (`bed.py run OPTIONS...`) until the block ends:
    yields its ready line (JSON), fails the test if it is not ready within
    60 s, and stops it with EOF on its stdin (its stop signal)."""
    proc = subprocess.Popen(
        [sys.executable, BED_PY, "run", *options],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=60)
    except queue.Empty:
        line = ""
    if not line:
        proc.kill()
        pytest.fail(f"bed did not start:\n{proc.stderr.read()}")
    try:
        yield json.loads(line)
    finally:
        proc.stdin.close()
        proc.wait(30)
