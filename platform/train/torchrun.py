"""torchrun (torch.distributed.run) for the launcher's local ranks, stopped once and quietly.

A stop can reach torchrun twice: as a signal to the job's process group (the queue's cancel, a terminal's Ctrl-C)
and as the launcher's own SIGTERM. torchrun's handler raises at each one, so the second cut its shutdown short,
and the ranks, which die with torchrun, lost the steps since their last checkpoint. Here the first SIGTERM or
SIGINT starts torchrun's shutdown and later ones are ignored; the launcher prints the one line about the stop.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main

STOPS = (signal.SIGTERM, signal.SIGINT)


def _stop_once(signum: int, frame: FrameType | None) -> None:
    for sig in STOPS:
        signal.signal(sig, signal.SIG_IGN)
    raise SignalException(f"stopped by {signal.Signals(signum).name}", sigval=signal.Signals(signum))


if __name__ == "__main__":
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"  # SIGTERM and SIGINT are handled above
    for sig in STOPS:
        signal.signal(sig, _stop_once)
    try:
        main()
    except SignalException as stop:
        sys.exit(128 + stop.sigval)
