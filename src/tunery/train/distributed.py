"""Training on several processes or machines: the data split, collectives, checkpoints.

Launching (the rank environment, checks, torchrun) is train/launch.py.

`tunery train --nproc N` re-runs itself under torchrun; every launched process finds WORLD_SIZE in
its environment and trains one rank with the same loop (train/loop.py), which asks a `Dist` for its
share of each step and for the few collectives it needs.

Exactness: each rank takes a disjoint share of every step's examples and divides its summed loss
by the units of the WHOLE step (all-reduced), times the world size because DDP and FSDP average
gradients over ranks. The sum over ranks is then the one-process loss of the same step, so the
loss curve of N processes equals one process with the same global batch.

Every rank runs the same number of forward/backward passes per step (short shares are padded with
a zero-weight pass): FSDP all-gathers parameters in every forward, so unequal counts would hang.
Objectives call the decoder and the LM head separately, which a DDP or FSDP wrapper around the
model would never see; `LossModule` runs the objective inside its own forward, so the wrapper (the
FSDP root, the DDP reducer, the DeepSpeed engine) sees exactly one forward per backward.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from tunery.errors import ConfigError
from tunery.models.unwrap import unwrap
from tunery.train import checkpoint as ckpt
from tunery.train.batching import Step, split_micro_batches
from tunery.train.launch import check, check_local_rank

# --------------------------------------------------------------------------- the data split


def rank_share(indices: list[int], lengths: list[int], rank: int, world: int) -> list[int]:
    """This rank's examples of one step: dealt round-robin by length, so shares are disjoint, cover
    the step, and carry about the same number of tokens."""
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    return order[rank::world]


# --------------------------------------------------------------------------- the runtime


class LossModule(torch.nn.Module):
    """`forward(fn, *args)` returns `fn(model, *args)`: the one module a wrapper sees per pass."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


class Dist:
    """One rank's view of a distributed run (built by `start` in each launched process). One process
    training alone uses `single.SingleProcess`, which has the same methods."""

    launched = True  # accelerate's process state describes the process group: it lives on
    stops_alone = False  # ranks stop together, at step boundaries only (`any` votes on it)

    def __init__(self, config: Any, device: torch.device):
        import torch.distributed as td

        self.td = td
        self.settings = config.distributed
        self.strategy: str = self.settings.strategy
        self.rank, self.world = td.get_rank(), td.get_world_size()
        self.is_main = self.rank == 0
        self.device = device  # where collective tensors live (nccl needs CUDA tensors)
        self.model: torch.nn.Module | None = None
        self.wrapped: Any = None  # what training forwards go through (DDP, FSDP root, DeepSpeed engine)
        self.accelerator: Any = None
        self.lengths: list[int] = []
        self.token_budget = 0

    # ------------------------------------------------------------- collectives
    def barrier(self) -> None:
        self.td.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.td.all_reduce(t)
        return t.tolist()

    def all_max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self.td.all_reduce(t, op=self.td.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """A signal may reach ranks at different moments: all stop if any was told to."""
        return self.all_max(int(flag)) > 0

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills the tokenized cache), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    # ------------------------------------------------------------- model preparation
    def accelerator_kwargs(self, max_grad_norm: float) -> dict[str, Any]:
        from accelerate.utils import DistributedDataParallelKwargs

        # Only training passes go through DDP (every rank makes the same number), so its per-forward
        # buffer sync never waits for a rank that is evaluating alone.
        kwargs: dict[str, Any] = {
            "kwargs_handlers": [
                DistributedDataParallelKwargs(find_unused_parameters=self.settings.find_unused_parameters)
            ]
        }
        if self.strategy == "deepspeed":  # untested here: no CUDA (see docs/distributed.md)
            from accelerate.utils import DeepSpeedPlugin

            ds = self.settings.deepspeed
            kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
                hf_ds_config=ds.config_file,
                zero_stage=ds.zero_stage,
                offload_optimizer_device="cpu" if ds.offload_optimizer else "none",
                gradient_accumulation_steps=1,  # the loop accumulates and says when to sync
                gradient_clipping=max_grad_norm or None,
                zero3_save_16bit_model=ds.zero_stage == 3,  # the model/ dir needs gathered weights
            )
        return kwargs

    def shard(self, model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
        """Move the model to this rank's device; under FSDP shard it (before the optimizer exists).

        FSDP shards from host memory: `fully_shard` moves one block at a time to the GPU and keeps
        only this rank's shard there, so no rank ever holds the whole model on its GPU."""
        self.accelerator = accelerator
        self.model = model
        if self.strategy == "fsdp":
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
            self.wrapped = _fully_shard(LossModule(model), self.settings.fsdp, accelerator.device, dtype)
        else:
            self.model = model = model.to(accelerator.device)
        return model

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """DDP / DeepSpeed wrap the loss module through accelerate; FSDP is already sharded, and only
        its optimizer goes through accelerate, so that fp16 losses are scaled in backward, gradients
        unscaled before clipping and steps with overflowed gradients skipped, as without FSDP.
        The model the loop holds stays the unwrapped one (`shard`'s); forwards go through `call`."""
        if self.strategy == "fsdp":
            if self.accelerator.mixed_precision != "fp16":
                return model, optimizer
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            # the sharded scaler agrees on inf/nan across ranks, so every rank skips together
            self.accelerator.scaler = ShardedGradScaler()
            return model, self.accelerator.prepare_optimizer(optimizer, device_placement=False)
        self.wrapped, optimizer = self.accelerator.prepare(LossModule(self.model), optimizer)
        return model, optimizer

    # ------------------------------------------------------------- the step
    def plan(self, step: Step) -> list[tuple[tuple[int, ...], bool]]:
        """This rank's micro-batches of `step` as (indices, real); padded so every rank makes as many
        passes as the busiest one (padding passes reuse the step's first example at weight 0)."""
        indices = [i for mb in step.micro_batches for i in mb]
        mine = rank_share(indices, self.lengths, self.rank, self.world)
        local = split_micro_batches(mine, self.lengths, self.token_budget) if mine else []
        passes = self.all_max(len(local))
        return [(mb, True) for mb in local] + [((indices[0],), False)] * (passes - len(local))

    @property
    def loss_scale(self) -> float:
        return float(self.world)  # the wrappers average gradients over ranks; the loop wants the sum

    def call(self, fn: Callable[..., Any], *args: Any, train: bool = False) -> Any:
        """`fn(model, *args)` on this rank. Sharded models are always called through their root;
        DDP only for training (its reducer), so evaluation may run on one rank alone."""
        if self.strategy == "ddp" and not train:
            return fn(self.model, *args)
        return self.wrapped(fn, *args)

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are exchanged once per step, in the last backward."""
        if self.strategy == "fsdp":
            self.wrapped.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.strategy == "deepspeed":
            self.accelerator.gradient_state._set_sync_gradients(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.wrapped.no_sync()

    def extra_eval_here(self) -> bool:
        # sharded models need every rank in every forward; a DDP replica evaluates alone on rank 0
        return self.strategy != "ddp" or self.is_main

    def check_objective(self, objective: Any) -> None:
        if objective.rollout is not None and self.strategy != "ddp":
            raise ConfigError(
                f"Objective {objective.name!r} samples completions, which ranks do at different lengths; "
                f"with distributed.strategy={self.strategy} that would hang.",
                hint="Use distributed.strategy=ddp for online objectives.",
            )

    # ------------------------------------------------------------- saving
    def save_model(self, directory: Path, save_fn: Callable[[Path], None]) -> None:
        """Write the usable model from rank 0; sharded parameters are gathered to it first."""
        if self.strategy == "ddp":
            if self.is_main:
                save_fn(directory)
        else:
            full = self._full_state_dict()  # collective: every rank takes part
            if self.is_main:
                with _state_dict_view(self.model, full):
                    save_fn(directory)
        self.barrier()

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.strategy == "deepspeed":
            state = self.accelerator.get_state_dict(self.wrapped)
            return {k.removeprefix("model."): v for k, v in (state or {}).items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        state = {k.removeprefix("model."): v for k, v in state.items()}
        # Tied weights (lm_head = embeddings) appear under both names; saving keeps the first, as
        # transformers does.
        seen = {n for n, _ in self.model.named_parameters()}
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            if name not in seen:
                state.pop(name, None)
        return state

    def write_checkpoint(
        self, ckpt_root: Path, step: int, *, optimizer: Any, scheduler: Any, meta: dict[str, Any], save_model
    ) -> Path:
        """checkpoints/step-NNNNNN, built in a temporary dir every rank writes into, renamed by rank 0
        once all are done. DDP: rank 0 writes what one process would (so either can resume the
        other). FSDP: parameters and optimizer state as sharded DCP files in `sharded/`. Ranks > 0
        add their RNG state (rng-rankN)."""
        final = ckpt_root / f"{ckpt.PREFIX}{step:06d}"
        tmp = ckpt_root / f".tmp-{ckpt.PREFIX}{step:06d}-dist"  # one name all ranks know
        if self.is_main:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        save_model(tmp / "model")
        state: dict[str, Any] = {"scheduler": scheduler.state_dict(), "rng": ckpt.rng_state()}
        if self.strategy == "ddp":
            if self.is_main:
                from safetensors.torch import save_file

                save_file(ckpt.trainable_state(self.model), str(tmp / "trainable.safetensors"))
                state["optimizer"] = optimizer.state_dict()
        elif self.strategy == "fsdp":
            import torch.distributed.checkpoint as dcp

            dcp.save(self._sharded_state(optimizer), checkpoint_id=str(tmp / "sharded"))
        else:
            self.wrapped.save_checkpoint(str(tmp / "deepspeed"), tag="state")
        if self.is_main:
            ckpt.save_state(state, tmp, "state")
            (tmp / "meta.json").write_text(json.dumps({**meta, "world_size": self.world}, indent=2))
        else:
            ckpt.save_state({"rng": state["rng"]}, tmp, f"rng-rank{self.rank}")
        self.barrier()  # every rank's files are in place before the rename makes them a checkpoint
        if self.is_main:
            ckpt._fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            ckpt._fsync_dir(ckpt_root)
        self.barrier()
        return final

    def restore(self, path: Path, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        dirs = {"fsdp": "sharded", "deepspeed": "deepspeed"}
        written_by = next((k for k, d in dirs.items() if (path / d).is_dir()), "ddp")
        if written_by != self.strategy:
            raise ConfigError(
                f"{path} was written with distributed.strategy={written_by}; resume with that strategy.",
                param="distributed.strategy",
            )
        if self.strategy == "ddp":  # the single-process layout; every rank reads it
            meta = ckpt.restore(path, self.model, optimizer, scheduler)
        else:
            if self.strategy == "fsdp":
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import set_state_dict

                state = self._sharded_state(optimizer)
                dcp.load(state, checkpoint_id=str(path / "sharded"))
                set_state_dict(
                    self.wrapped,
                    optimizer,
                    model_state_dict=state["model"],
                    optim_state_dict=state["optim"],
                    options=_dcp_options(),
                )
            else:
                self.wrapped.load_checkpoint(str(path / "deepspeed"), tag="state")
            common = ckpt.load_state(path, "state")
            scheduler.load_state_dict(common["scheduler"])
            ckpt.set_rng_state(common["rng"])
            meta = json.loads((path / "meta.json").read_text())
        if (path / f"rng-rank{self.rank}.json").exists():  # else (new world size) rank 0's generator
            ckpt.set_rng_state(ckpt.load_state(path, f"rng-rank{self.rank}")["rng"])
        return meta

    def _sharded_state(self, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.wrapped, optimizer, options=_dcp_options())
        return {"model": msd, "optim": osd}

    def close(self) -> None:
        """Leave the group. The wrapper goes first, while the group is still registered: a DDP
        reducer (or FSDP state) holds the process group, and when it is the group's last holder its
        release destroys the group with the GIL held. That destructor joins gloo's worker threads,
        and a worker still finishing the last collective needs the GIL to free a Python-owned
        tensor: a deadlock after the run had ended (a rank hung at exit, about one launch in 25 on
        a loaded machine; PyTorch issue 56297). Released through the registry instead, the group is
        destroyed by a binding that drops the GIL first."""
        with contextlib.suppress(Exception):
            self.barrier()  # nobody leaves while rank 0 still writes the run directory
            self.model = self.wrapped = self.accelerator = None
            gc.collect()  # a reference cycle holding the wrapper would free it later, as the last holder
            self.td.destroy_process_group()


def _dcp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen base weights come from the base model again; only what trains is checkpointed
    return StateDictOptions(ignore_frozen_params=True)


def _fully_shard(
    root: LossModule, settings: Any, device: torch.device, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """FSDP2 with torch's own `fully_shard`: each transformer block is a unit, the rest (embeddings,
    tied LM head, final norm) sits in the root. accelerate (1.15) turns FSDP on only for GPU-like
    devices and would wrap a CPU model in DDP instead, so the CPU/gloo path must be torch's; the
    GPU path uses the same code so that what the tests check here is what runs there."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    except ImportError as exc:  # torch < 2.6
        raise ConfigError("distributed.strategy=fsdp needs torch >= 2.6 (FSDP2).") from exc
    model = root.model
    base = unwrap(model)
    block_names = set(getattr(base, "_no_split_modules", None) or [])
    kwargs: dict[str, Any] = {"reshard_after_forward": settings.reshard_after_forward}
    if settings.cpu_offload and device.type == "cuda":
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if dtype is not None:
        # Parameters are all-gathered and computed in half precision (one dtype per unit, even when
        # a bf16 base carries fp32 adapters); gradients are reduced in fp32, and the optimizer keeps
        # fp32 shards.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for module in list(model.modules()):
        if type(module).__name__ in block_names:
            fully_shard(module, **kwargs)
    return fully_shard(root, **kwargs)


@contextlib.contextmanager
def _state_dict_view(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> Iterator[None]:
    """The methods' `save` read `model.state_dict()`, which FSDP answers with shards: show them the
    gathered full tensors instead, for the duration of one save."""
    model.state_dict = lambda *args, **kwargs: dict(full)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.state_dict


def start(config: Any) -> Dist:
    """Join the process group of a launched run (the backend follows the device)."""
    import torch.distributed as td

    check(config)
    cuda = torch.cuda.is_available()
    backend = config.distributed.backend
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    device = torch.device("cpu")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        check_local_rank(local_rank, torch.cuda.device_count())
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        # Rank 0 alone tokenizes, saves and generates while the others wait in a collective; the
        # default timeout (10 minutes for NCCL) would kill a large job there.
        timeout = datetime.timedelta(minutes=config.distributed.timeout_minutes)
        td.init_process_group(backend=backend, timeout=timeout)
    return Dist(config, device)
