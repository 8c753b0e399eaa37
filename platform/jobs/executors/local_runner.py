"""Runs one job's command and records how it ended, so the exit code outlives the scheduler that started it.

`python local_runner.py JOB_DIR --lock-fd N -- COMMAND...` is started by LocalExecutor in a session of its
own. It keeps the job's lock (inherited as fd N, and passed on to COMMAND, which learns its number from
JOB_LOCK_FD_VARIABLE and passes it on to its own helpers, torchrun), records its pid and start time
in runner.json, runs COMMAND with the job's log as stdout and stderr, and atomically writes exit_code when it
ends. A stop signals the whole process group; the runner ignores SIGTERM so that the trainer's
checkpoint-then-exit is still recorded. It imports only the standard library (the executor runs it by path,
not as part of the faceforge package, which would pull in torch): it waits for hours in a few MB.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RUNNER_FILE, EXIT_CODE_FILE, LOCK_FILE, LOG_FILE, STOP_FILE = (
    "runner.json",
    "exit_code",
    "runner.lock",
    "job.log",
    "stop",
)
JOB_LOCK_FD_VARIABLE = "FACEFORGE_JOB_LOCK_FD"


def process_start_time(pid: int) -> int | None:
    """When a live process started (clock ticks since boot, /proc/<pid>/stat field 22); None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, *rest = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return None if state in ("Z", "X") else int(rest[18])


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old content or the new, never half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def _say(message: str) -> None:
    print(f"[faceforge runner {time.strftime('%Y-%m-%d %H:%M:%S')}] {message}", flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], usage="%(prog)s JOB_DIR --lock-fd N -- COMMAND..."
    )
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--lock-fd", type=int, required=True, help="the job's locked runner.lock, inherited")
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        parser.error("give the command to run after --")
    split = argv.index("--")
    args, command = parser.parse_args(argv[:split]), argv[split + 1 :]
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a handler, not SIG_IGN, so the child gets SIGTERM
    pid = os.getpid()
    write_atomic(args.job_dir / RUNNER_FILE, json.dumps({"pid": pid, "start_time": process_start_time(pid)}))
    _say(f"pid {pid} starts: {' '.join(command)}")
    try:
        env = {**os.environ, JOB_LOCK_FD_VARIABLE: str(args.lock_fd)}
        code = subprocess.Popen(command, pass_fds=(args.lock_fd,), env=env).wait()
    except OSError as err:
        _say(f"cannot start the command: {err}")
        code = 127
    write_atomic(args.job_dir / EXIT_CODE_FILE, str(code))
    _say(f"exit code {code}" + (f" (killed by signal {-code})" if code < 0 else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
