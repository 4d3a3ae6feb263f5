"""Distributed checkpoints: torch.distributed.checkpoint through its Hugging Face safetensors
storage writer and reader, so a checkpoint of many processes holds no pickle either.

    checkpoints/step-NNNNNN/
        dcp/shard-0000R-model-00001-of-00001.safetensors   rank R-1's share of the weights and the
                                        AdamW moments (each tensor once over the ranks: DCP's dedup
                                        of replicated tensors, FSDP2's shards; the sharding offsets in
                                        the safetensors header, DCP_SHARDING_INFO)
        model.safetensors               the consolidated weights (rank 0): generate, fine-tune, export
        state.json                      step, counters, data position, the optimizer's param_groups
                                        (its hyper-parameters) and every rank's RNG state, as JSON
        model.json, tokenizer.json, manifest.json    as a one-process checkpoint (runs/checkpoint.py)

The writer takes only tensors, no shared storage: the state dict is flattened to
"model.<fqn>" / "optim.<fqn>.<state>" tensors, the tied W_e once (the alias dropped; loading in
place re-ties it, the model's two names being one parameter). Rank 0 builds the folder as
`.tmp-step-N`, every rank writes its shard there, a barrier, then rank 0 writes the rest and the
manifest and renames the folder: a rank that dies mid-save leaves no manifest, and the checkpoint
is never used. Resharding: the reader assembles any tensor from the chunks the header offsets
name, so a checkpoint of W processes loads at any world size; a one-process checkpoint loads in
every rank of a group from its ordinary files (its weights and moments are whole).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import PretuneError
from . import checkpoint as ckpt


DCP_DIR = "dcp"


def is_distributed(ck: str | Path) -> bool:
    return (Path(ck) / DCP_DIR).is_dir()


def _canonical(model: torch.nn.Module) -> set[str]:
    """The state-dict names that are not an alias of another (the tied output matrix is W_e): of
    each group of names of one tensor the alphabetically first, the one safetensors' save_model
    keeps, so a consolidated model.safetensors has the keys of a one-process one."""
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return {min(ns) for ns in groups.values()} | {n for n, _ in model.named_buffers()}


def _flat(model, optimizer, with_optimizer: bool) -> tuple[dict[str, torch.Tensor], list]:
    """(tensors, param_groups): the model and optimizer state as flat FQN-named tensors (DTensor
    shards under FSDP2), the groups' hyper-parameters apart (JSON). Without `with_optimizer` (an
    optimizer that has not stepped yet) only the weights: get_optimizer_state_dict would make the
    moments with a zero-gradient step, which counts as Adam's first."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(model)
    keep = _canonical(model)
    flat = {f"model.{k}": v for k, v in msd.items() if k in keep and torch.is_tensor(v)}
    if not with_optimizer:
        return flat, optimizer.state_dict()["param_groups"]
    osd = get_optimizer_state_dict(model, optimizer)
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                flat[f"optim.{fqn}.{k}"] = v
    return flat, osd["param_groups"]


def _rng_json(dp) -> dict:
    """Every rank's torch RNG states (CPU, and the current CUDA device), hex, gathered on rank 0."""
    out = {"torch_cpu": [t.numpy().tobytes().hex() for t in dp.gather_bytes(torch.get_rng_state())]}
    if torch.cuda.is_available() and dp.device is not None and dp.device.type == "cuda":
        out["torch_cuda"] = [t.numpy().tobytes().hex() for t in dp.gather_bytes(torch.cuda.get_rng_state())]
    return out


def _restore_rng(rng: dict, rank: int, seed_fallback: int) -> None:
    def tensor(h):
        return torch.frombuffer(bytearray(bytes.fromhex(h)), dtype=torch.uint8).clone()
    cpu = rng.get("torch_cpu") or []
    if rank < len(cpu):
        torch.set_rng_state(tensor(cpu[rank]))
    else:  # a rank the saving run did not have
        torch.manual_seed(seed_fallback + rank)
    cuda = rng.get("torch_cuda") or []
    if torch.cuda.is_available() and rank < len(cuda):
        torch.cuda.set_rng_state(tensor(cuda[rank]))


def save(run_dir, step: int, model, optimizer, state: dict, dp, keep_last: int = 3,
         keep: set[int] | None = None) -> Path:
    """A distributed checkpoint of step `step` (collective: every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    ckdir = Path(run_dir) / "checkpoints"
    final, tmp = ckdir / f"step-{step:06d}", ckdir / f".tmp-step-{step:06d}"
    stepped = bool(optimizer.state)
    flat, groups = _flat(model, optimizer, stepped)
    rng = _rng_json(dp)
    full = _full_weights(model, dp)
    try:
        if dp.main:
            ckdir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(run_dir)
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / DCP_DIR).mkdir(parents=True)
        dp.barrier()
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(tmp / DCP_DIR), save_distributed=True))
        ckpt.fault_point("after_weights")
        dp.barrier()  # every shard is on disk before the manifest can name it
        if dp.main:
            from safetensors.torch import save_file, save_model
            if full is None:  # DDP: rank 0's replica, written as a one-process checkpoint writes it
                save_model(model, str(tmp / "model.safetensors"))
            else:
                save_file(full, str(tmp / "model.safetensors"))
            body = {"step": step, **state, "optimizer": {"param_groups": groups, "moments": stepped}, "rng": rng,
                    "world_size": dp.world, "parallel": dp.parallel}
            (tmp / "state.json").write_text(json.dumps(body, indent=1))
            ckpt._self_contained(Path(run_dir), tmp, model)
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            for name in files:
                ckpt._fsync(tmp / name)
            ckpt.fault_point("before_manifest")
            from ..fileio import atomic_write_json, fsync_dir
            fsync_dir(tmp / DCP_DIR)
            atomic_write_json(tmp / ckpt.MANIFEST, {"step": step, "files": {n: ckpt._sha256(tmp / n) for n in files}})
            ckpt.fault_point("before_rename")
            _swap_in(tmp, final)
    except OSError as e:
        raise PretuneError(f"cannot write checkpoint step {step}: {e.strerror or e}", str(ckdir),
                           "free disk space or fix permissions, then rerun the same command; "
                           "the previous checkpoint is intact") from e
    dp.barrier()
    if dp.main:
        ckpt.prune(run_dir, keep_last, keep or set())
    dp.barrier()
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place; a re-save of the step moves the old one aside first
    (as `.old-step-N`, which runs/checkpoint.clean_partial puts back if we die in between)."""
    import os
    import shutil
    from ..fileio import fsync_dir
    old = final.parent / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _full_weights(model, dp) -> dict[str, torch.Tensor] | None:
    """The whole weights on rank 0 (collective under FSDP2), each tensor once, on the CPU."""
    keep = _canonical(model)
    if dp.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        return None
    return {k: v.detach().cpu().contiguous() for k, v in sd.items() if k in keep} if dp.main else {}


def load(ck: Path, model, optimizer, dp) -> dict:
    """Weights, optimizer and RNG of a checkpoint, at this world size; returns state.json."""
    ck = Path(ck)
    if not is_distributed(ck):
        return _load_whole(ck, model, optimizer, dp)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    for f in sorted((ck / DCP_DIR).glob("*.safetensors")):
        from ..safety import check_safetensors
        check_safetensors(f)
    state = ckpt.load_training_state(ck)  # state.json (no optimizer given: its tensors come below)
    stepped = bool(state["optimizer"].get("moments", True))
    flat, _ = _flat(model, optimizer, stepped)
    try:
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(ck / DCP_DIR)), no_dist=not dp.active)
    except (RuntimeError, KeyError, AssertionError, ValueError) as e:
        raise PretuneError(f"the distributed checkpoint does not fit the model: {str(e).splitlines()[0][:200]}",
                           str(ck), "the checkpoint was written by a different model config") from e
    if not stepped:  # saved before the first step: the optimizer starts afresh
        optimizer.state.clear()
        _restore_rng(state.get("rng") or {}, dp.rank, 0)
        return state
    osd: dict = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for key, v in flat.items():
        if key.startswith("optim."):
            fqn, k = key[len("optim."):].rsplit(".", 1)
            osd["state"].setdefault(fqn, {})[k] = v
    set_optimizer_state_dict(model, optimizer, osd)
    _restore_rng(state.get("rng") or {}, dp.rank, 0)
    return state


def _load_whole(ck: Path, model, optimizer, dp) -> dict:
    """A one-process checkpoint in a group: every rank reads the whole weights and moments (DDP:
    its replica; FSDP2: sharded as they are set)."""
    if dp.parallel != "fsdp":
        ckpt.load_weights(model, ck)
        state = ckpt.load_training_state(ck, optimizer)
    else:  # the whole tensors, each rank keeping its shard (set_*_state_dict with full_state_dict)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        from ..safety import load_safetensors
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, load_safetensors(ck / "model.safetensors"), options=opts)
        state = ckpt.load_training_state(ck)
        tensors = load_safetensors(ck / "optimizer.safetensors") if (ck / "optimizer.safetensors").exists() else {}
        if tensors:
            fqn = {id(p): n for n, p in model.named_parameters()}
            names = [fqn[id(p)] for g in optimizer.param_groups for p in g["params"]]  # the saved indices' order
            osd: dict = {"state": {}, "param_groups": []}
            for key, v in tensors.items():
                idx, k = key.split(".", 1)
                osd["state"].setdefault(names[int(idx)], {})[k] = v
            for key, v in state["optimizer"].get("scalars", {}).items():
                idx, k = key.split(".", 1)
                osd["state"].setdefault(names[int(idx)], {})[k] = v
            for g in state["optimizer"]["param_groups"]:
                osd["param_groups"].append({**g, "params": [names[i] for i in g["params"]]})
            set_optimizer_state_dict(model, optimizer, osd, options=opts)
    if dp.rank > 0:  # rank 0 continues the saved stream; the others their own
        torch.manual_seed(int(state.get("step", 0)) * 1000 + dp.rank)
    return state
