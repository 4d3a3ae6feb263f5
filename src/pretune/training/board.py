"""--train.log tensorboard: the logged metrics also as TensorBoard event files (RUN/tb/), through
the `tensorboard` package's own writer (the [tensorboard] extra), on rank 0 only."""

from __future__ import annotations

from pathlib import Path

from ..errors import PretuneError


def require() -> None:
    """One line naming the pip command when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        raise PretuneError("--train.log tensorboard needs the tensorboard package", None,
                           "pip install 'tensorboard>=2.16' (or pip install 'pretune[tensorboard]')") from e


class Board:
    """One scalar per numeric metric of each logged record, at its step."""

    def __init__(self, run_dir: str | Path, step: int = 0):
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            from tensorboard.compat.proto import event_pb2, summary_pb2
        except ImportError as e:
            raise PretuneError("--train.log tensorboard needs the tensorboard package", None,
                               "pip install 'tensorboard>=2.16' (or pip install 'pretune[tensorboard]')") from e
        self._event, self._summary = event_pb2, summary_pb2
        self.dir = Path(run_dir) / "tb"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(self.dir))

    def add(self, record: dict) -> None:
        import time
        step = int(record.get("step", 0))
        values = [self._summary.Summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if values:
            self.writer.add_event(self._event.Event(wall_time=time.time(), step=step,
                                                    summary=self._summary.Summary(value=values)))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
