"""The `vmsnap` command (and `python -m vmsnap`): Ctrl-C is honoured from the first instruction.

Importing the CLI (numpy, qemu.qmp, asyncio; each verb loads the rest when it runs, under
the CLI's own handling) takes a noticeable fraction of a second; an interrupt meanwhile would
end in a KeyboardInterrupt traceback. Until the CLI has loaded and takes SIGINT over, an
interrupt ends the process at once with one line and the shell's code.
(Before this module runs, the interpreter's own start-up, some tens of milliseconds, is
Python's.) An interrupt that the parent ignores (a background job) stays ignored.
"""

import gc
import os
import signal
import sys


def _interrupted(signum: int, frame: object) -> None:
    os.write(2, b"vmsnap: interrupted\n")
    os._exit(128 + signum)


def main() -> int:
    # vmsnap does no linear algebra: numpy's OpenBLAS need not start a thread per core at
    # import (~25 ms of CPU on every command, before a lazy restore's guest can run)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    honour = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if honour:
        signal.signal(signal.SIGINT, _interrupted)
    from .api import pause_gc

    pause_gc()  # until the verb has loaded (vmsnap.cli, vmsnap.api._run)
    from .cli import main as cli_main

    if honour:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return cli_main()
    finally:
        # what is left goes with the process: the interpreter's collections at exit need
        # not walk every object the imports made (~20-30 ms of CPU on every command)
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
