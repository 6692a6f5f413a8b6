"""How train_gpt.py's loop measures and reports, as the record's loop does: the training clock
(validation excluded, no device sync while it runs), each step's train loss read a step late
from a host buffer, and the logger (stdout and the log file).
"""
import sys
import time

import torch
import torch.distributed as dist


class Logger:
    """Rank 0 writes to stdout and the log file; errors go to stderr (every rank) and the log."""

    def __init__(self, rank):
        self.rank, self.file = rank, None

    def __call__(self, msg, error=False):
        if error or self.rank == 0:
            print(msg, file=sys.stderr if error else sys.stdout, flush=True)
        if self.file:
            self.file.write(msg + "\n")
            self.file.flush()


class Clock:
    """Training time with validation excluded, stopped and started where the record's is: at a
    dist.barrier() (several ranks) or torch.cuda.synchronize(); elapsed() is host time between."""

    def __init__(self, ctx):
        self.ctx, self.total, self.started = ctx, 0.0, None
        self.last_val_time, self.last_val_step = 0.0, 0

    def _sync(self):
        if self.ctx.world > 1:
            dist.barrier()
        elif self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def start(self):
        self._sync()
        self.started = time.perf_counter()

    def stop(self):
        self._sync()
        self.total += time.perf_counter() - self.started
        self.started = None

    def elapsed(self):
        return self.total + (time.perf_counter() - self.started if self.started else 0.0)

    def val_fields(self, step):
        """train_time and step_avg (mean step time since the previous validation) of a val line."""
        steps = step - self.last_val_step
        avg = 1000 * (self.total - self.last_val_time) / steps if steps else float("nan")
        self.last_val_time, self.last_val_step = self.total, step
        return f"train_time:{self.total:.3f}s step_avg:{avg:.2f}ms"


class TrainLosses:
    """Each step's train loss, read without stalling the device: copied (non-blocking) into one of
    two host buffers (pinned on CUDA, an event marking its arrival) and read a step later."""

    def __init__(self, device):
        cuda = device.type == "cuda"
        self.buffers = [torch.zeros((), dtype=torch.float32, pin_memory=cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self.pending = []  # (buffer, step, train time after the step), oldest first

    def put(self, loss, step, elapsed):
        i = step % 2
        assert all(j != i for j, _, _ in self.pending), "read the step before first"
        self.buffers[i].copy_(loss, non_blocking=True)
        if self.events[i] is not None:
            self.events[i].record()
        self.pending.append((i, step, elapsed))

    def take(self):
        """(step, summed loss, train time) of the oldest unread step; waits for its copy only."""
        i, step, elapsed = self.pending.pop(0)
        if self.events[i] is not None:
            self.events[i].synchronize()
        return step, self.buffers[i].item(), elapsed  # a host tensor: no device sync
