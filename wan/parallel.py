"""Multi-GPU generation on torch.distributed: Ulysses sequence parallel, CFG-parallel, sharded weights.

Started by `torchrun --nproc_per_node N`; NCCL on GPUs, gloo on CPU. Pure PyTorch (no triton).
Parallelism is a property of how the same DiT runs, not a fork of it:

* Ulysses (U ranks): the token sequence is padded to a multiple of U and rank r keeps tokens
  [r*L/U, (r+1)*L/U). Everything outside self-attention is token-local. Around self-attention,
  one all-to-all turns q, k, v from "L/U tokens x all heads" into "all tokens x heads/U" and one
  turns the output back, so softmax(q k^T) v is exact. RoPE uses global positions (token_offset),
  padded keys are masked (k_lens = true L), the head output is all-gathered once at the end.
* CFG-parallel (2 halves): half 0 computes the conditional forward and half 1 the unconditional
  one of every step at the same time; one all-gather of the velocity within each (cond, uncond)
  pair, then every rank combines and steps the scheduler identically (bit-identical latents).
* FSDP2 (`fully_shard`): each DiT block / T5 block is sharded over all ranks (1/N of the weights
  per rank), gathered just before its forward and freed after.

Rank layout for N = U x C (C = 2 with cfg_parallel, else 1): rank = c*U + u. The Ulysses group
of a rank is {c*U + j : j < U}; its CFG pair is {u, U + u}.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from . import attention as _attention
from .naming import Arg, NamedError

__all__ = [
    "ParallelError", "Ulysses", "ParallelState", "init_from_env", "build_state", "start", "destroy",
    "under_torchrun", "check_request", "ParallelRequest",
    "sequence_parallel", "enable_sequence_parallel", "disable_sequence_parallel",
    "apply_to_pipeline", "shard_model", "seq_to_heads", "heads_to_seq", "all_gather_seq",
]


class ParallelError(NamedError):
    """A bad parallel configuration: one line naming the arguments (`Arg`s: `name=value` here, the
    flags in the CLIs, exit code 2)."""


# --------------------------------------------------------------------------------------
# Collectives on contiguous buffers
# --------------------------------------------------------------------------------------

def _all_to_all(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """out[j] <- chunk of rank j's inp addressed to this rank (dim 0 split in equal chunks)."""
    try:
        dist.all_to_all_single(out, inp, group=group)
    except (RuntimeError, NotImplementedError):  # a backend without all_to_all: gather everything
        n, me = dist.get_world_size(group), dist.get_rank(group)
        full = [torch.empty_like(inp) for _ in range(n)]
        dist.all_gather(full, inp, group=group)
        for dst, src in zip(out.chunk(n, 0), full):
            dst.copy_(src.chunk(n, 0)[me])


def seq_to_heads(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, L/U, H, D] (this rank's tokens, all heads) -> [B, L, H/U, D] (all tokens, this rank's heads).

    Send buffer [U, B, L/U, H/U, D]: slot j = head chunk j (goes to rank j). Received slot j =
    rank j's tokens of our head chunk, so concatenating the slots along tokens restores order.
    """
    if size == 1:
        return x
    B, Ls, H, D = x.shape
    send = x.reshape(B, Ls, size, H // size, D).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    _all_to_all(recv, send, group)
    return recv.permute(1, 0, 2, 3, 4).reshape(B, size * Ls, H // size, D)


def heads_to_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, L, H/U, D] (all tokens, this rank's heads) -> [B, L/U, H, D]: the inverse of seq_to_heads."""
    if size == 1:
        return x
    B, L, Hl, D = x.shape
    send = x.reshape(B, size, L // size, Hl, D).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    _all_to_all(recv, send, group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, L // size, size * Hl, D)


def all_gather_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """[B, L/U, ...] on each rank -> [B, L, ...] on every rank (rank order = token order)."""
    if size == 1:
        return x
    inp = x.transpose(0, 1).contiguous()  # tokens first: the gathered buffer is already in order
    out = inp.new_empty((size * inp.shape[0], *inp.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)
    return out.transpose(0, 1)


# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------

@dataclass
class Ulysses:
    """This rank's place in its Ulysses group; attached to every SelfAttention of a model."""
    group: object
    size: int
    rank: int

    def padded_len(self, n: int) -> int:
        return math.ceil(n / self.size) * self.size

    def pad(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [B, L', C], L' the next multiple of U (zero tokens appended)."""
        extra = self.padded_len(tokens.shape[1]) - tokens.shape[1]
        return tokens if extra == 0 else torch.nn.functional.pad(tokens, (0, 0, 0, extra))

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous chunk of a padded [B, L', C] sequence."""
        return tokens.chunk(self.size, dim=1)[self.rank]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_seq(x, self.group, self.size)

    def token_offset(self, local_len: int) -> int:
        """Global index of this rank's first token (all chunks have the same length)."""
        return self.rank * local_len

    def attention(self, q, k, v, k_lens=None, out_dtype=None):
        """Exact attention over the full sequence from sequence-sharded q, k, v [B, L/U, H, D].

        all-to-all #1 (q, k, v in one buffer when they share a dtype), attention on H/U heads
        with padded keys masked, all-to-all #2 back to [B, L/U, H, D].
        """
        if q.dtype == k.dtype == v.dtype:
            # one exchange for q, k, v: stack along a leading dim so each rank's heads stay together
            stacked = torch.stack([q, k, v], dim=0)  # [3, B, L/U, H, D]
            t, B, Ls, H, D = stacked.shape
            send = stacked.reshape(t, B, Ls, self.size, H // self.size, D).permute(3, 0, 1, 2, 4, 5).contiguous()
            recv = torch.empty_like(send)
            _all_to_all(recv, send, self.group)
            full = recv.permute(1, 2, 0, 3, 4, 5).reshape(t, B, self.size * Ls, H // self.size, D)
            q, k, v = full.unbind(0)
        else:
            q, k, v = (seq_to_heads(a, self.group, self.size) for a in (q, k, v))
        o = _attention.attention(q, k, v, k_lens=k_lens, out_dtype=out_dtype)
        return heads_to_seq(o, self.group, self.size)


@dataclass
class ParallelState:
    """Where this process sits: world, rank, device, its Ulysses group and its CFG pair."""
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ulysses_size: int = 1
    cfg_parallel: bool = False
    ulysses: Ulysses | None = None
    cfg_group: object = None
    cfg_rank: int = 0          # 0: computes the conditional branch, 1: the unconditional one
    owns_group: bool = False   # True when init_from_env created the default process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's seed on every rank."""
        return self.broadcast_int(seed)

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value (an int64) on every rank: a seed, a step cache's decision."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device())
        dist.broadcast(t, src=0)
        return int(t.item())

    def exchange_cfg(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) on every rank of a CFG pair, from this rank's branch output."""
        inp = mine.contiguous()
        out = inp.new_empty((2, *inp.shape))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, inp.unsqueeze(0), group=self.cfg_group)
        return out[0], out[1]

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def build_state(ulysses_size: int = 1, cfg_parallel: bool = False, device=None) -> ParallelState:
    """Create the Ulysses and CFG sub-groups on an initialised default group (every rank must
    call this, with the same arguments). N must equal U x (2 if cfg_parallel else 1)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    halves = 2 if cfg_parallel else 1
    if world != ulysses_size * halves:
        x2 = " x 2 ({cfg})" if cfg_parallel else ""
        raise ParallelError("{world} processes, but {u}" + x2 + " needs {n}", world=world, n=ulysses_size * halves,
                            u=Arg("ulysses_size", ulysses_size), cfg=Arg("cfg_parallel", True))
    u, c = rank % ulysses_size, rank // ulysses_size
    sp_group = cfg_group = None
    for h in range(halves):  # every rank creates every group, in the same order
        g = dist.new_group([h * ulysses_size + j for j in range(ulysses_size)]) if halves > 1 else dist.group.WORLD
        if h == c:
            sp_group = g
    if cfg_parallel:
        for j in range(ulysses_size):
            g = dist.new_group([j, ulysses_size + j]) if ulysses_size > 1 else dist.group.WORLD
            if j == u:
                cfg_group = g
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return ParallelState(world=world, rank=rank, local_rank=local, device=dev, ulysses_size=ulysses_size,
                         cfg_parallel=cfg_parallel,
                         ulysses=Ulysses(sp_group, ulysses_size, u) if ulysses_size > 1 else None,
                         cfg_group=cfg_group, cfg_rank=c if cfg_parallel else 0)


def init_from_env(ulysses_size: int = 1, cfg_parallel: bool = False, timeout: float = 600.0,
                  device: str | None = None) -> ParallelState:
    """Join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and build
    the sub-groups. NCCL with one GPU per process (cuda:LOCAL_RANK) when `device` is cuda (the
    default when CUDA is available), gloo on CPU. Collectives that wait longer than `timeout`
    seconds fail instead of hanging. Without torchrun: a one-process state, no group."""
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not under_torchrun():
        dev = torch.device("cuda" if use_cuda else "cpu")
        return ParallelState(device=dev, ulysses_size=ulysses_size, cfg_parallel=cfg_parallel)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ParallelError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible "
                                f"(start at most that many processes per node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        kw = {"device_id": dev} if use_cuda else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout), **kw)
    state = build_state(ulysses_size, cfg_parallel, device=dev)
    state.local_rank, state.owns_group = local, owns
    return state


def start(req: ParallelRequest, device) -> ParallelState | None:
    """For a checked request: join torchrun's group when it asks for more than one process (one
    GPU per process, cuda:LOCAL_RANK), else None (the one-GPU path, nothing to set up)."""
    if req.world == 1:
        return None
    return init_from_env(req.ulysses_size, req.cfg_parallel, req.timeout, device=torch.device(device).type)


def destroy(state: ParallelState | None) -> None:
    """Tear down the process group that init_from_env created (safe to call twice)."""
    if state is not None and state.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        state.owns_group = False


# --------------------------------------------------------------------------------------
# Hooks into the model
# --------------------------------------------------------------------------------------

def enable_sequence_parallel(model, ulysses: Ulysses | None):
    """Make `model` (a WanModel) run Ulysses: shards tokens in forward, all-to-all around each
    self-attention. `None` restores the one-GPU path."""
    if ulysses is not None and model.num_heads % ulysses.size:
        raise ParallelError("{u} must divide the {n} attention heads", u=Arg("ulysses_size", ulysses.size),
                            n=model.num_heads)
    model.sp = ulysses
    for blk in model.blocks:
        blk.self_attn.sp = ulysses
    return model


def disable_sequence_parallel(model):
    return enable_sequence_parallel(model, None)


@contextlib.contextmanager
def sequence_parallel(model, ulysses: Ulysses | None):
    """`with sequence_parallel(model, state.ulysses): model(...)`."""
    prev = getattr(model, "sp", None)
    enable_sequence_parallel(model, ulysses)
    try:
        yield model
    finally:
        enable_sequence_parallel(model, prev)


def shard_model(module, blocks, device: torch.device):
    """FSDP2: shard each of `blocks` and then the rest of `module` over all ranks; weights are
    all-gathered just before a block runs and freed after (reshard_after_forward)."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ParallelError("FSDP2 sharding ({dit} / {t5}) needs torch >= 2.6, this is torch {v}",
                            dit=Arg("dit_fsdp", True), t5=Arg("t5_fsdp", True), v=torch.__version__) from None
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for blk in blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def apply_to_pipeline(pipe, state: ParallelState, dit_fsdp: bool = False, t5_fsdp: bool = False):
    """Give a pipeline its parallel state: Ulysses hooks on its DiT models (both experts, or the one
    of ti2v-5B), optional FSDP2 sharding of them and of the text encoder. Every rank must call it."""
    pipe.parallel = state
    for m in pipe.dit_models():
        enable_sequence_parallel(m, state.ulysses)
        if dit_fsdp and state.world > 1:
            shard_model(m, m.blocks, state.device)
    if t5_fsdp and state.world > 1:
        enc = pipe.text_encoder.model
        shard_model(enc, enc.blocks, state.device)
    return pipe


# --------------------------------------------------------------------------------------
# The request and its checks
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParallelRequest:
    ulysses_size: int = 1
    cfg_parallel: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    timeout: float = 600.0

    @property
    def world(self) -> int:
        return self.ulysses_size * (2 if self.cfg_parallel else 1)

    def summary(self) -> str:
        """One log line: '4 processes: ulysses 2 x cfg 2, dit_fsdp'."""
        extra = "".join(f", {n}" for n, on in (("dit_fsdp", self.dit_fsdp), ("t5_fsdp", self.t5_fsdp)) if on)
        return f"{self.world} processes: ulysses {self.ulysses_size} x cfg {2 if self.cfg_parallel else 1}{extra}"


def check_request(req: ParallelRequest, num_heads: int, device: torch.device, env=None) -> ParallelRequest:
    """Check a request against torchrun's environment (`env`, default os.environ) and the model's
    attention heads, before anything is built. Returns `req`; raises ParallelError with one line
    naming the arguments as `name=value`. (How it combines with the other options of a run is
    wan_triton.plan's table.)"""
    env = os.environ if env is None else env
    u = Arg("ulysses_size", req.ulysses_size)
    if req.ulysses_size < 1:
        raise ParallelError("{u} must be >= 1", u=u)
    if not math.isfinite(req.timeout) or req.timeout <= 0:  # NaN would pass a plain '<= 0'
        raise ParallelError("{t} must be > 0 seconds (a finite number), got {v}", t=Arg("timeout"), v=req.timeout)
    if num_heads % req.ulysses_size:
        raise ParallelError("{u} must divide the model's {n} attention heads", u=u, n=num_heads)
    asked = [a for a, on in ((u, req.ulysses_size > 1), (Arg("cfg_parallel", True), req.cfg_parallel),
                             (Arg("dit_fsdp", True), req.dit_fsdp), (Arg("t5_fsdp", True), req.t5_fsdp)) if on]
    torchrun = all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
    world = int(env.get("WORLD_SIZE", 1)) if torchrun else 1
    if asked and not torchrun:
        raise ParallelError("{asked} needs torchrun: start {n} processes, one per GPU (torchrun --nproc_per_node {n} "
                            "...)", asked=asked, n=req.world)
    if world != req.world:
        x2 = " x 2 ({cfg})" if req.cfg_parallel else ""
        raise ParallelError("torchrun started {world} processes, but {u}" + x2 + " needs {n} (N must equal {bare_u} "
                            "x 2 with {cfg}, else {bare_u})", world=world, u=u, n=req.world,
                            cfg=Arg("cfg_parallel", True), bare_u=Arg("ulysses_size"))
    if (req.dit_fsdp or req.t5_fsdp) and world == 1:
        fsdp = [a for a, on in ((Arg("dit_fsdp", True), req.dit_fsdp), (Arg("t5_fsdp", True), req.t5_fsdp)) if on]
        raise ParallelError("{fsdp} needs more than one process", fsdp=fsdp)
    if world > 1 and device.type == "cuda":  # the same verdict on every rank of a node
        per_node = int(env.get("LOCAL_WORLD_SIZE", world))
        if per_node > torch.cuda.device_count():
            raise ParallelError(f"torchrun started {per_node} processes on this node but only "
                                f"{torch.cuda.device_count()} GPUs are visible (one GPU per process)")
    return req
