"""A worker process: executes queued runs of one store on one device slot, one at a time.

``python -m vpeft_viz.runs.worker --store DIR [--slot cpu:0|cuda:N]`` — started by
:func:`vpeft_viz.runs.queue.ensure_worker`, never by the Streamlit script thread.

The worker holds its slot's lock for life (see :mod:`vpeft_viz.runs.queue`), claims the
oldest queued run it can execute, and runs it in a forked child process: a run that crashes
hard (out of memory, a segfault in a kernel) takes only the child with it, the worker marks
the run ``failed`` and goes on with the next, and each run's memory is returned when its
child exits. torch and timm are imported once, before forking, so a run starts in well
under a second. With nothing left to do for a short grace period, the worker exits.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

from . import queue
from .store import Run, RunStore, RunStoreError, owner_fields, read_json

GRACE_S = 2.0  # idle time before exiting (runs submitted right after one ends need no restart)
POLL_S = 0.25
LOCK_WAIT_S = 2.0  # how long to wait for a slot lock another process probes or releases


def log(message: str) -> None:
    print(f"[worker {os.getpid()} {time.strftime('%H:%M:%S')}] {message}", flush=True)


class SlotLock:
    """``flock`` on the slot's lock file, held while the worker lives (the kernel drops it)."""

    def __init__(self, store: RunStore, slot: str):
        self.path = queue.lock_path(store, slot)
        self.fd: int | None = None

    def acquire(self, wait_s: float = LOCK_WAIT_S) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def cpu_threads(slot_kind: str) -> int:
    """Intra-op threads for a run: the CPU cores shared among CPU workers; few beside a GPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if slot_kind == "cuda":
        return max(1, min(4, cores))
    return max(1, cores // queue.cpu_worker_count())


def claim_next(store: RunStore, slot: str) -> Run | None:
    """Claim the oldest queued run this slot can execute, or None."""
    kind = slot.split(":")[0]
    has_cuda = kind == "cuda" or queue.cuda_device_count() > 0
    for job in queue.queued_jobs(store):
        if queue.run_device_kind(job.config, has_cuda) != kind:
            continue
        if queue.try_claim(job.run, f"worker {slot}"):
            return job.run
    return None


def _child(run_path: str, slot: str, threads: int) -> None:
    """Body of the forked run process: record who runs it, then execute it."""
    import torch

    from .execute import execute_run

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    torch.set_num_threads(threads)
    run = Run(Path(run_path))
    if run.cancel_requested():  # cancelled between the claim and now
        run.set_status("cancelled", finished=time.time(), error=None)
        return
    run.set_status("running", **owner_fields(), worker_pid=os.getppid(), slot=slot)
    try:
        execute_run(run)
    except BaseException:  # already recorded in status.json and error.txt by execute_run
        sys.exit(1)


def execute_in_child(run: Run, slot: str, threads: int) -> None:
    """Execute one run in a child process; a child that dies leaves the run ``failed``."""
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_child, args=(str(run.path), slot, threads),
                       name=f"run-{run.id}", daemon=False)
    proc.start()
    try:
        proc.join()
    except BaseException:  # the worker itself is being stopped: stop the run with it
        proc.terminate()
        proc.join(10)
        _fail_if_unfinished(run, proc)
        raise
    _fail_if_unfinished(run, proc)
    log(f"{run.id}: {run.status().get('status')}")


def _fail_if_unfinished(run: Run, proc: multiprocessing.process.BaseProcess) -> None:
    try:  # the file as written (Run.status would already report the dead child, less precisely)
        state = read_json(run.path / "status.json", {}).get("status", "queued")
    except RunStoreError:
        state = "running"
    if state in ("queued", "running"):
        code = proc.exitcode
        why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        run.set_status("failed", error=f"run process died ({why}, pid {proc.pid})",
                       finished=time.time(), owner_gone=True)


def serve(store: RunStore, slot: str, *, grace_s: float = GRACE_S) -> int:
    """Execute queued runs until none are left for this slot; returns how many it ran."""
    lock = SlotLock(store, slot)
    if not lock.acquire():
        log(f"slot {slot} is held by another worker; exiting")
        return 0
    import torch  # noqa: F401 - imported once here so every forked run starts warm

    from . import execute  # noqa: F401

    threads = cpu_threads(slot.split(":")[0])
    log(f"serving {store.root} on {slot} with {threads} CPU thread(s)")
    done, idle_since = 0, time.monotonic()
    while True:
        run = claim_next(store, slot)
        if run is not None:
            log(f"{run.id}: start")
            try:
                execute_in_child(run, slot, threads)
            except Exception as e:  # never let one run take the worker down
                log(f"{run.id}: could not execute: {type(e).__name__}: {e}")
                run.set_status("failed", error=f"worker could not execute the run: {e}",
                               finished=time.time())
            done += 1
            idle_since = time.monotonic()
            continue
        if time.monotonic() - idle_since < grace_s:
            time.sleep(POLL_S)
            continue
        # Release first, then look once more: a run submitted while the dashboard saw this
        # worker alive (so it started none) is then either seen here or gets a new worker.
        lock.release()
        if not _has_work(store, slot) or not lock.acquire(wait_s=0.5):
            log(f"idle; exiting after {done} run(s)")
            return done
        idle_since = time.monotonic()


def _has_work(store: RunStore, slot: str) -> bool:
    kind = slot.split(":")[0]
    has_cuda = kind == "cuda" or queue.cuda_device_count() > 0
    return any(queue.run_device_kind(j.config, has_cuda) == kind
               for j in queue.queued_jobs(store))


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vpeft_viz.runs.worker",
                                description="execute queued runs of a run store")
    p.add_argument("--store", type=Path, required=True, help="run store directory")
    p.add_argument("--slot", default="cpu:0", help="device slot: cpu, cpu:N or cuda:N")
    p.add_argument("--grace", type=float, default=GRACE_S,
                   help="seconds to wait for new runs before exiting")
    args = p.parse_args(argv)
    slot = queue.normalise_slot(args.slot)
    signal.signal(signal.SIGTERM, _stop)
    # Before torch loads OpenMP: idle threads sleep instead of spinning, so a run sharing the
    # cores with the dashboard (or anything else) is not slowed ten-fold by its own threads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        serve(RunStore(args.store), slot, grace_s=args.grace)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's teardown: with torch loaded it can take seconds, during which the
    # slot stays locked. Nothing is left to flush but the log.
    sys.stdout.flush()
    os._exit(code)
