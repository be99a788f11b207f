"""DistributedDataParallel over the N devices of one host (NCCL on GPUs, gloo over N CPU processes).

Rank 0 is the Celery pool process that claimed the job: it alone talks to the database and MLflow. A pool
process is a daemonic multiprocessing child and may not fork children of its own through multiprocessing,
so ranks 1..N-1 are plain subprocesses (`python -m trainyard_workers.distributed <plan.json>`); the plan
rank 0 writes tells them everything they need (spec, dataset, checkpoint to resume from) so they need
neither the database nor MLflow. They only train.

Every rank runs the same collectives in the same order:
  per epoch   rank 0 broadcasts the epoch number (0: training is over);
  per batch   an all_reduce of a stop flag (cancel, lost lease, SIGTERM) before the DDP step;
  per epoch   an all_reduce of the training loss.
Validation, checkpoints and the test pass run on rank 0 alone on the unwrapped module, while the others
wait at the next broadcast, so no collective ever runs during rank-0-only work.
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from trainyard.specs import JobSpec
from trainyard_workers.checkpoints import load_checkpoint
from trainyard_workers.loop import StopRequested, train_one_epoch
from trainyard_workers.training_setup import (
    build_training_parts,
    decode_splits,
    make_pipeline,
    rank_batches,
    restore_training_state,
    select_device,
    training_module,
    use_bf16,
)

log = logging.getLogger(__name__)

# Joining is bounded: a rank that never starts (import error, out of memory) fails the job in minutes.
INIT_TIMEOUT = timedelta(minutes=2)
# Once joined, ranks 1..N-1 wait at the epoch broadcast while rank 0 validates, checkpoints and records
# the epoch (retrying through a database outage), so a collective may legitimately wait long. A rank that
# dies is noticed at once anyway (its sockets close), and rank 0 kills the others on every exit path.
COLLECTIVE_TIMEOUT = timedelta(hours=1)
STOP_GRACE_SECONDS = 10.0  # for ranks told "done" to exit on their own before they are terminated
OUTPUT_TAIL = 30  # lines of a rank's output kept for the error message when it dies


class RankFailed(RuntimeError):
    """A rank other than 0 died or never joined; the message carries its exit code and last lines."""


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def threads_per_rank(threads: int, world_size: int) -> int:
    """N processes share the cores one process would have had: no oversubscription."""
    return max(1, threads // world_size)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    # Augmentation and dropout differ per rank (else N ranks would augment their slices alike) and are
    # reseeded each epoch from (seed, rank, epoch), so a resumed job needs no per-rank state from the
    # checkpoint: only the data order, which is the same on every rank and is checkpointed as before.
    return (seed * 1_000_003 + epoch * 1_009 + rank * 7_919 + 1) % (2**63 - 1)


class Ranks:
    """One rank's side of the job's collectives; the same calls, in the same order, on every rank."""

    def __init__(self, rank: int, world_size: int, seed: int) -> None:
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = select_device(rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL binds each rank's communicator to its current device
        # Two generators, unlike one device: the data order must match across ranks whatever each rank's
        # augmentation draws.
        self.data_generator = torch.Generator().manual_seed(seed)
        self.augmentation_generator = torch.Generator().manual_seed(epoch_seed(seed, rank, 0))
        self._samples_per_epoch = 0

    def join(self, store: dist.Store) -> None:
        dist.init_process_group(backend_for(self.device), store=store, rank=self.rank, world_size=self.world_size,
                                timeout=INIT_TIMEOUT, device_id=self.device if self.device.type == "cuda" else None)
        self._flag(0.0, dist.ReduceOp.SUM)  # everyone is here (within INIT_TIMEOUT) ...
        dist.set_timeout(COLLECTIVE_TIMEOUT)  # ... so from now on waiting is rank 0's work, not a lost rank

    def train_batches(self, split: TensorDataset, batch_size: int) -> DataLoader:
        loader = rank_batches(split, batch_size, self.rank, self.world_size, self.data_generator, self.device)
        self._samples_per_epoch = loader.sampler.samples_per_epoch
        return loader

    def wrap(self, model: nn.Module) -> nn.Module:
        # DDP broadcasts rank 0's weights here: a resumed or pretrained start is the same on every rank.
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _flag(self, value: float, op) -> float:
        tensor = torch.tensor([value], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())

    def stop_check(self, should_stop: Callable[[], bool]) -> Callable[[], bool]:
        """`should_stop` agreed by all ranks once per batch: one rank asked, every rank stops at that batch."""
        return lambda: self._flag(1.0 if should_stop() else 0.0, dist.ReduceOp.MAX) > 0

    def announce_epoch(self, epoch: int) -> int:
        """Rank 0 says which epoch comes next (0: training is over); every rank returns it."""
        tensor = torch.tensor([epoch], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        epoch = int(tensor.item())
        if epoch:
            torch.manual_seed(epoch_seed(self.seed, self.rank, epoch))
            self.augmentation_generator.manual_seed(epoch_seed(self.seed, self.rank, epoch))
        return epoch

    def epoch_loss(self, loss: float) -> float:
        """The epoch's mean training loss over every rank's samples (ranks' slices may differ by one)."""
        tensor = torch.tensor([loss * self._samples_per_epoch, float(self._samples_per_epoch)],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor[0] / tensor[1].clamp_min(1))


class Rank0(Ranks):
    """Rank 0: starts ranks 1..N-1, relays their output into its log (so into the job's), and owns their
    lifetime: on every way out (success, failure, stop) it ends the process group and reaps them."""

    def __init__(self, plan: dict[str, Any], world_size: int, threads: int) -> None:
        super().__init__(0, world_size, JobSpec.model_validate(plan["spec"]).params.seed)
        self.plan = {**plan, "threads": threads}
        self.children: dict[int, subprocess.Popen] = {}
        self._tails: dict[int, collections.deque[str]] = {}
        self._relays: list[threading.Thread] = []
        self._store: dist.TCPStore | None = None
        self._folder: Path | None = None
        self._told_done = False  # ranks told "training is over" exit by themselves

    def __enter__(self) -> Rank0:
        try:
            self._launch()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _launch(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.plan["threads"])
        # Port 0: the OS picks a free port, so two DDP jobs on one host never collide.
        self._store = dist.TCPStore("127.0.0.1", 0, self.world_size, is_master=True, timeout=INIT_TIMEOUT,
                                    wait_for_workers=False)
        self._folder = Path(tempfile.mkdtemp(prefix=f"trainyard-job-{self.plan['job_id']}-ddp-"))
        plan_file = self._folder / "plan.json"
        plan_file.write_text(json.dumps(self.plan))
        for rank in range(1, self.world_size):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(self.world_size),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self._store.port),
                   "TRAINYARD_DDP_PARENT": str(os.getpid())}
            # Same process group as the worker: killing a lost worker's group kills its ranks too.
            child = subprocess.Popen([sys.executable, "-m", "trainyard_workers.distributed", str(plan_file)],
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, errors="replace")
            self.children[rank] = child
            self._tails[rank] = collections.deque(maxlen=OUTPUT_TAIL)
            relay = threading.Thread(target=self._relay, args=(rank, child), name=f"rank-{rank}-output", daemon=True)
            relay.start()
            self._relays.append(relay)
        log.info("DDP over %s %s processes (%s): rank 0 is pid %s; %s", self.world_size, self.device.type,
                 backend_for(self.device), os.getpid(),
                 ", ".join(f"rank {rank} pid {c.pid}" for rank, c in self.children.items()))

    def _relay(self, rank: int, child: subprocess.Popen) -> None:
        for line in child.stdout:
            line = line.rstrip()
            self._tails[rank].append(line)
            log.info("[rank %s] %s", rank, line)

    def start(self) -> None:
        """Wait (bounded) until every rank has loaded its data and built its model, then join them."""
        deadline = time.monotonic() + INIT_TIMEOUT.total_seconds()
        waiting = [f"ready/{rank}" for rank in self.children]
        while not self._store.check(waiting):
            if (failure := self.failure()) is not None:
                raise RankFailed(failure)
            if time.monotonic() > deadline:
                raise RankFailed(f"ranks did not start within {INIT_TIMEOUT.total_seconds():.0f} s")
            time.sleep(0.1)
        self.join(self._store)
        log.info("rank 0 of %s on %s joined the others", self.world_size, self.device)

    def failure(self, wait: float = 0.0) -> str | None:
        """How a dead rank ended (exit code and last output), or None while all live; waits up to `wait` s."""
        deadline = time.monotonic() + wait
        while True:
            for rank, child in self.children.items():
                if child.poll() is not None:
                    tail = "\n".join(self._tails[rank])
                    return f"rank {rank} of {self.world_size} exited with code {child.returncode}:\n{tail}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def describe_failure(self, exc: BaseException) -> BaseException:
        """A collective that failed because a peer went away becomes a RankFailed naming that rank."""
        if isinstance(exc, RankFailed):
            return exc
        failure = self.failure(wait=5.0)
        return RankFailed(failure) if failure is not None else exc

    def __exit__(self, *exc: object) -> None:
        # Ranks told "done" exit by themselves, and so do ranks that stopped with rank 0 at a batch (a short
        # grace for those). Any other still alive waits in a collective that will never come (rank 0 failed,
        # or stopped outside a batch): SIGKILL, since a rank holds nothing to save (rank 0 writes every
        # checkpoint) and a SIGTERM cannot interrupt a collective blocked in C++.
        grace = time.monotonic() + (STOP_GRACE_SECONDS if self._told_done else 2.0)
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.0, grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for relay in self._relays:
            relay.join(timeout=5)
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # the peers are gone; nothing is left to tell them
            log.warning("could not destroy the process group cleanly", exc_info=True)
        finally:
            self._store = None
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)

    def announce_epoch(self, epoch: int) -> int:
        self._told_done = epoch == 0
        return super().announce_epoch(epoch)


# ---- ranks 1..N-1 -----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this rank when rank 0 dies (a SIGKILLed worker cannot reap us itself). Linux
    ties this to the thread that started us: a prefork pool runs its task, and so `Popen`, in the main thread."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the broken sockets end us at the next collective instead
        pass
    if str(os.getppid()) != os.environ.get("TRAINYARD_DDP_PARENT"):
        sys.exit("rank 0 exited before this rank started")


def follow(plan: dict[str, Any], rank: int, world_size: int) -> None:
    """Train as rank `rank`: build what rank 0 builds, then run the epochs rank 0 announces."""
    spec = JobSpec.model_validate(plan["spec"])
    params = spec.params
    ranks = Ranks(rank, world_size, params.seed)
    if ranks.device.type == "cpu":
        torch.set_num_threads(plan["threads"])
    torch.manual_seed(params.seed)  # the same initial weights as rank 0 (DDP broadcasts rank 0's anyway)
    size = tuple(plan["image_size"]) if plan.get("image_size") else None
    splits = decode_splits(plan["dataset"]["format"], plan["dataset"]["path"], params, size)
    pipeline = make_pipeline(splits, ranks.device, params, ranks.augmentation_generator)
    parts = build_training_parts(spec, splits, ranks.device, ranks.train_batches(splits.train, params.batch_size))
    if plan.get("resume"):
        restore_training_state(parts, load_checkpoint(plan["resume"]), ranks.data_generator)
    bf16 = use_bf16(ranks.device, params.precision)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=INIT_TIMEOUT)
    store.set(f"ready/{rank}", "1")
    ranks.join(store)
    # SIGTERM (a service manager stopping the whole worker) stops every rank at the next batch, through
    # the stop flag, so the job goes back to the queue instead of failing on a vanished rank.
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    log.info("rank %s of %s on %s joined (%s torch threads, %s batches of %s per epoch)", rank, world_size,
             ranks.device, torch.get_num_threads(), len(parts.train_batches), ranks._samples_per_epoch)
    model = training_module(ranks.wrap(parts.model), spec.params)
    try:
        while epoch := ranks.announce_epoch(0):
            loss = train_one_epoch(model, parts.train_batches, parts.optimizer, pipeline, parts.loss_fn, bf16=bf16,
                                   grad_clip_norm=params.grad_clip_norm,
                                   batch_scheduler=parts.scheduler if parts.per_batch else None,
                                   should_stop=ranks.stop_check(terminated.is_set))
            ranks.epoch_loss(loss)
            if parts.scheduler is not None and not parts.per_batch:
                parts.scheduler.step()
            log.info("rank %s: epoch %s trained", rank, epoch)
        log.info("rank %s: training over", rank)
    except StopRequested:
        log.info("rank %s: stopped with the others", rank)
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    # Rank 0 owns this process's lifetime: a Ctrl-C meant for the worker must not kill a rank mid-collective
    # (the worker's shutdown stops the job through rank 0), and rank 0's own death ends this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
    plan = json.loads(Path(argv[1]).read_text())
    follow(plan, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
