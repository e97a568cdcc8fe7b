"""Ctrl-C and SIGTERM for training: the first one is a request, the second one is final.

Installed before anything slow (imports, tokenizer training, data encoding), so no signal is
lost or swallowed: the handler only sets a flag, which the run checks at points where stopping
leaves nothing half-written. A second signal raises KeyboardInterrupt at once. Long work before
the first step runs in a worker thread while the main thread waits, so signals reach their
handler within a fraction of a second even while C code (SentencePiece) runs.
"""

import atexit
import contextlib
import os
import signal
import sys
import threading

from attnlm.errors import AttnlmError

SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.1  # how often the main thread looks at the flag while a worker runs


class Interrupted(AttnlmError):
    exit_code = 130


class Flag:
    signal = None

    def check(self):
        if self.signal is not None:
            raise Interrupted("interrupted before training started; nothing was written")

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) in a worker thread; stops waiting for it (Interrupted) as soon as a
        signal came. The worker is a daemon: an abandoned one ends with the process."""
        result, done = {}, threading.Event()

        def work():
            try:
                result["value"] = fn(*args, **kwargs)
            except BaseException as err:  # handed to the main thread as it is
                result["error"] = err
            finally:
                done.set()

        threading.Thread(target=work, daemon=True).start()
        try:
            while not done.wait(POLL_S):
                self.check()
        except BaseException:
            _exit_early_if_running(done)
            raise
        if "error" in result:
            raise result["error"]
        return result["value"]


def _exit_early_if_running(done):
    """A worker left inside C++ code (SentencePiece) makes the C++ runtime abort the process
    at exit; if it still runs then, end the process at once, as interrupted."""
    def exit_now():
        if not done.is_set():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(Interrupted.exit_code)

    atexit.register(exit_now)


_current = None


@contextlib.contextmanager
def deferred_interrupts():
    """The process's Flag, installing the handler unless an outer block already did."""
    global _current
    if _current is not None:
        yield _current
        return
    flag = Flag()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield flag
        return

    def handler(signum, frame):
        if flag.signal is not None:  # asked twice: stop now; the last checkpoint stands
            raise KeyboardInterrupt
        flag.signal = signum

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    _current = flag
    try:
        yield flag
    finally:
        _current = None
        for s, h in previous.items():
            signal.signal(s, h)
