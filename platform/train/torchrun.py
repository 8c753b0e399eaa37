"""torchrun (torch.distributed.run) for the launcher's local ranks, stopped once and quietly.

A stop can reach torchrun more than once: as a signal to the job's process group (the queue's cancel, a terminal's
Ctrl-C, again if pressed twice, a hangup) and as the launcher's own SIGTERM. torchrun's handler raises at each one,
so a later one cut its shutdown short, and the ranks, which die with torchrun, lost the steps since their last
checkpoint. Here the first SIGTERM, SIGINT or SIGHUP starts torchrun's shutdown (SIGTERM to the ranks, which
checkpoint) and later ones are ignored; the launcher prints the one line about the stop.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

# What stops a training run with a checkpoint, in every process of it: a kill, a terminal's Ctrl-C or hangup.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _drop(signum: int, frame: FrameType | None) -> None:
    """Not SIG_IGN: a stop that arrived with the first, before its handler ran, would then be reported as "ignored
    due to race condition" with a traceback."""


def _stop_once(signum: int, frame: FrameType | None) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _drop)
    raise SignalException(f"stopped by {signal.Signals(signum).name}", sigval=signal.SIGTERM)


if __name__ == "__main__":
    # torchrun's --signals-to-handle (read from this variable) would put its own handler over ours.
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGQUIT"
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop_once)
    try:
        main()
    except SignalException as stop:
        sys.exit(128 + stop.sigval)
    except ChildFailedError as failed:  # the ranks have said why; the table says which ended how, the traceback nothing
        print(failed, file=sys.stderr)
        code = failed.get_first_failure()[1].exitcode
        sys.exit(code if code > 0 else 128 - code)  # a rank killed by signal N: 128 + N, as a shell reports it
