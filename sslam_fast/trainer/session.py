"""What the pretraining and fine-tuning runs share around their loops: the exception that stops a
run, and the session context (signals routed to the trainer, handlers restored and the data
pipeline closed afterwards)."""
import contextlib
import signal


class TrainingStopped(RuntimeError):
    """The run cannot go on (too many non-finite steps in a row, a collapse with stop_on_collapse)."""


@contextlib.contextmanager
def run_session(trainer):
    """While the block runs, SIGTERM / SIGINT set ``trainer.stop_signal`` (the loop saves after the
    step and exits; a second signal raises KeyboardInterrupt: exit now, without saving). Afterwards
    the previous handlers are back and ``trainer.data`` is closed. ``trainer`` has ``stop_signal``,
    ``log`` (a RunLog) and ``data``."""
    def on_signal(signum, frame):
        if trainer.stop_signal is not None:
            raise KeyboardInterrupt
        trainer.stop_signal = signal.Signals(signum).name
        trainer.log.message(f"{trainer.stop_signal} received: saving a checkpoint after this step, then exiting")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        trainer.data.close()
