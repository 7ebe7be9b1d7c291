"""Reading batches ahead of the step without losing the exact data position.

A background thread pulls batches from the loader (and moves them to the GPU) while the step
computes. Each batch travels with the loader position just after it, so the position saved in a
checkpoint is that of the last batch a step consumed, not of the batches already read ahead.

On CUDA the copies run from pinned memory on a side stream, without blocking the host; the
consuming stream waits for a batch's copy (an event) and the batch's tensors are marked as used on
it (``record_stream``), so the caching allocator does not hand their memory back to the side
stream while the step still reads them. On a CPU a batch is handed over as the loader made it.
"""
import queue
import threading
from typing import Any, Dict, Optional

import torch

_DONE = object()


class Prefetcher:
    def __init__(self, loader, device: torch.device, depth: int = 2):
        self.loader = loader
        self.device = device
        self.depth = depth
        self.position: Optional[Dict[str, Any]] = None  # loader state after the last consumed batch
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def state_dict(self) -> Dict[str, Any]:
        return self.position if self.position is not None else self.loader.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self._thread is not None:
            raise RuntimeError("load the data position before the first batch is read")
        self.loader.load_state_dict(state)

    def _to_device(self, batch: Dict[str, Any], stream) -> Dict[str, Any]:
        if stream is None:
            return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.cuda.stream(stream):
            out = {k: (v.pin_memory() if v.device.type == "cpu" else v).to(self.device, non_blocking=True)
                   if torch.is_tensor(v) else v for k, v in batch.items()}
            out["_copied"] = torch.cuda.Event()
            out["_copied"].record(stream)
        return out

    def _work(self) -> None:
        stream = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device)
        try:
            for batch in self.loader:
                item = (self._to_device(batch, stream), self.loader.state_dict())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(_DONE)
        except BaseException as e:  # handed to the training thread, which raises it
            self._queue.put(e)

    def next(self) -> Dict[str, torch.Tensor]:
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._work, name="sslam-prefetch", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self.position = item
        copied = batch.pop("_copied", None)
        if copied is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copied)
            for v in batch.values():
                if torch.is_tensor(v) and v.device.type == "cuda":
                    v.record_stream(stream)
        return batch

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
