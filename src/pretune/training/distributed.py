"""Data parallelism under torchrun: the process group, DDP or FSDP2, and what keeps a run's
semantics the same at every world size (docs/distributed.md).

`setup(tc)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
starts the process group: gloo on the CPU, NCCL on CUDA, plus a gloo group for the small CPU
collectives (the loss counts, the stop flag) so they never wait for the device. Without torchrun
(and without --train.parallel ddp|fsdp) it returns the one-process `Dist`, whose methods do
nothing: the loop calls the same helpers either way.

World-size-invariant semantics: the global batch of step s is micro-batch x grad_accum x world
rows drawn as one batch (data/loaders.py), each micro-batch a disjoint slice of it; every loss
term is normalised by the global count of what it predicts over the whole step (all-reduced),
so a rank's loss is sum_a term * n_local * W / N (objectives.losses.weighted) and DDP's mean
over the ranks gives the one-process loss of the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import timedelta

import torch

from ..errors import PretuneError


PARALLEL = ("auto", "none", "ddp", "fsdp")


class Dist:
    """The process's place in the group; the one-process instance is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, parallel: str = "none",
                 device: torch.device | None = None, cpu_group=None):
        self.rank, self.world, self.local_rank, self.parallel = rank, world, local_rank, parallel
        self.device = device
        self.cpu_group = cpu_group

    @property
    def active(self) -> bool:
        """A process group is running (world size 1 under --train.parallel ddp|fsdp included)."""
        return self.parallel in ("ddp", "fsdp")

    @property
    def main(self) -> bool:
        return self.rank == 0

    # ---- collectives -----------------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier(group=self.cpu_group)

    def sum_cpu(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a CPU tensor over the gloo group; returns it."""
        if self.active and self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t, group=self.cpu_group)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a device tensor (the step's logged loss and parts)."""
        if self.active and self.world > 1:
            import torch.distributed as dist
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a device tensor over the group, in place (a MoE layer's routing counts)."""
        if self.active and self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t

    def agree_stop(self, requested: bool, signum: int | None) -> tuple[bool, int | None]:
        """The stop every rank takes at a step boundary: stop if any rank asked (a hook, a signal),
        with the signal one of them got (the largest number). One gloo all-reduce (MAX) of two
        numbers; whatever a signal handler sets after it counts at the next boundary, so every
        rank leaves the loop at the same step and enters the checkpoint's collectives together."""
        if not (self.active and self.world > 1):
            return bool(requested or signum is not None), signum
        import torch.distributed as dist
        t = torch.tensor([float(bool(requested or signum is not None)), float(signum or 0)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(t[0].item() > 0), (int(t[1].item()) or None)

    def broadcast_json(self, obj):
        """Rank 0's JSON-able object on every rank (bytes in a uint8 tensor: no pickle on the wire)."""
        if not (self.active and self.world > 1):
            return obj
        import torch.distributed as dist
        data = json.dumps(obj).encode() if self.main else b""
        n = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(n, 0, group=self.cpu_group)
        buf = torch.zeros(int(n.item()), dtype=torch.uint8)
        if self.main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, 0, group=self.cpu_group)
        return json.loads(bytes(buf.tolist()).decode())

    def gather_bytes(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's uint8 tensor of the same length (the RNG states), on every rank."""
        if not (self.active and self.world > 1):
            return [t]
        import torch.distributed as dist
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.cpu_group)
        return out

    def check_same(self, what: str, value) -> None:
        """One line and exit 2 on every rank when the ranks were started with different `value`s
        (different configs, data), found before anything is written."""
        if not (self.active and self.world > 1):
            return
        import hashlib
        h = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
        mine = torch.frombuffer(bytearray(h), dtype=torch.uint8).clone()
        differ = [i for i, t in enumerate(self.gather_bytes(mine)) if not torch.equal(t, mine)]
        if differ:
            raise CollectiveError(f"the ranks were started with different {what} (rank {self.rank} differs "
                                  f"from rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))})",
                                  None, "start every rank with the same command and files")

    # ---- the model ---------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, tc) -> torch.nn.Module:
        """The module the loss runs through: a DDP wrapper (that passes attribute reads on to the
        model), the model itself after FSDP2's fully_shard (in place), or the model."""
        if self.parallel == "ddp":
            return _ddp_class()(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.parallel == "fsdp":
            from .fsdp import shard
            return shard(model, tc)
        return model

    def no_sync(self, forward, last: bool):
        """Gradient accumulation without an all-reduce per micro-batch: DDP's no_sync, FSDP2's
        set_requires_gradient_sync(False), on every micro-batch but the step's last."""
        if self.parallel == "ddp" and not last:
            return forward.no_sync()
        if self.parallel == "fsdp":
            getattr(forward, "_orig_mod", forward).set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def loss_scales(self, micro: list[dict]) -> list[dict] | None:
        """Each micro-batch's `loss_scale` {term: n_local * W / N_global, "moe_aux": W / A} with the
        counts of objectives.losses.loss_counts summed over the step's micro-batches and all-reduced
        (one gloo all-reduce of a few numbers per step). None at one process, one micro-batch: the
        plain means, unchanged. A MoE layer's auxiliary loss is this rank's share of the loss over
        the group's micro-batch (models/moe.py: group_sum), so W of it, averaged by DDP, is that
        loss; a stand-in micro-batch of a short last batch ("void") weighs 0 in every term."""
        from ..objectives.losses import loss_counts

        A = len(micro)
        if A == 1 and self.world == 1:
            return None
        counts = [loss_counts(b) for b in micro]
        names = sorted({k for c in counts for k in c})
        zero = torch.zeros((), dtype=torch.int64)
        local = torch.stack([torch.stack([c.get(k, zero) for k in names]) for c in counts]).double()
        total = self.sum_cpu(local.sum(0)).clamp_min(1)  # a count of 0 everywhere: its term is 0 anyway
        share = (local * self.world / total).float()  # n_local * W / N, per micro-batch and term
        return [{**{k: share[a, i] for i, k in enumerate(names)},
                 "moe_aux": 0.0 if micro[a].get("void") else self.world / A} for a in range(A)]


class CollectiveError(PretuneError):
    """A PretuneError every rank raises at once: only rank 0 prints it (cli/__init__.py)."""

    collective = True


def _ddp_class():
    from torch.nn.parallel import DistributedDataParallel

    class PassThroughDDP(DistributedDataParallel):
        """DDP whose attribute reads fall through to the model: the losses call model.config,
        model.logits, model.nsp_head... on what they are given (objectives/)."""

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return PassThroughDDP


_CURRENT = Dist()


def current() -> Dist:
    """This process's `Dist` (the one-process one until `setup` starts a group)."""
    return _CURRENT


def env_world() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def setup(tc) -> Dist:
    """Start (once) the process group torchrun's environment describes, choose DDP / FSDP2 / none
    from --train.parallel, resolve --train.global-batch into grad_accum, and return the `Dist`."""
    global _CURRENT
    world = env_world()
    parallel = tc.parallel
    if parallel not in PARALLEL:
        raise PretuneError(f"bad training option: parallel={parallel!r} is unknown", None,
                           "use auto, none, ddp or fsdp (--train.parallel)")
    if parallel == "auto":
        parallel = "ddp" if world > 1 else "none"
    if parallel == "none" and world > 1:
        raise PretuneError(f"--train.parallel none under torchrun with {world} processes", None,
                           "use --train.parallel ddp or fsdp, or run without torchrun")
    _resolve_global_batch(tc, world)
    if getattr(tc, "log", "jsonl") == "tensorboard":  # a missing package fails before anything is written
        from .board import require
        require()
    if parallel == "none":
        _CURRENT = Dist()
        return _CURRENT
    if _CURRENT.active and _CURRENT.parallel == parallel:
        return _CURRENT
    import torch.distributed as dist
    from .config import resolve_device

    device = resolve_device(tc.device)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # one process asked for ddp/fsdp without torchrun: a group of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
        timeout = timedelta(seconds=int(os.environ.get("PRETUNE_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend, timeout=timeout, **_attempt_store(timeout))
        cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else None
    else:  # the group is running (another parallel mode in the same process: scripts/gpu_check.py)
        cpu_group = _CURRENT.cpu_group
    _CURRENT = Dist(rank, dist.get_world_size(), local_rank, parallel, device, cpu_group)
    return _CURRENT


def _attempt_store(timeout) -> dict:
    """torchrun's agent store, its keys under this restart attempt's own prefix. With a static
    rendezvous (`--master-addr/--master-port`) the agent keeps one store across restarts, so a
    restarted rank could read the gloo address a dead rank of the previous attempt published and wait
    on it forever (seen under `--max-restarts`); a prefix per TORCHELASTIC_RESTART_COUNT keeps each
    attempt's rendezvous its own. Elsewhere: {} (init_process_group's env:// as usual)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return {}
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    tcp = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                        timeout=timeout)
    store = dist.PrefixStore(f"pretune/attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", tcp)
    return {"store": store, "rank": int(os.environ["RANK"]), "world_size": world}


def teardown() -> None:
    """End the process group (a test that runs several trainings in one process)."""
    global _CURRENT
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = Dist()


def _resolve_global_batch(tc, world: int) -> None:
    """--train.global-batch G: grad_accum = G / (batch_size x world), which must be whole; without
    it the global batch is batch_size x grad_accum x world. Either way tc.global_batch is set, the
    one number a resume with another world size compares (training/resume.py)."""
    if tc.global_batch is None:
        tc.global_batch = tc.batch_size * tc.grad_accum * world
        return
    per = tc.batch_size * world
    if tc.global_batch <= 0 or tc.global_batch % per:
        raise CollectiveError(f"--train.global-batch {tc.global_batch} is not a multiple of the micro-batch x "
                           f"world size = {tc.batch_size} x {world} = {per}", None,
                           f"use a multiple of {per} (e.g. {per * max(1, round(tc.global_batch / per))}), "
                           "or change --train.batch-size")
    tc.grad_accum = tc.global_batch // per


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
