"""Host memory (RAM) a pipeline build takes, checked before anything is built.

`WanT2V.from_config` builds the experts, the text encoder and the VAE where they will run; the
parts that land in host memory (all of them on a CPU, the text encoder with t5_cpu, the idle
expert with offload 'model', the DiT blocks when they stream) are counted here from the configs
(models built on the meta device: no memory), and compared with what the host can still give
(`wan.hostmem.host_memory`: the cgroup limit minus its usage, else MemAvailable). Too little is
one line (InputError) instead of an out-of-memory kill minutes later. `expert_bytes` and
`text_encoder_bytes` give the same sizes to the plan (what stays on the GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hostmem
from .configs import T2VConfig
from .requests import InputError


def _numel(make) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in make().parameters())


@dataclass(frozen=True)
class Footprint:
    """Bytes per part that a build puts in host memory."""
    parts: tuple  # ((name, bytes), ...)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    def describe(self) -> str:
        return ", ".join(f"{name} {n / 1e9:.1f} GB" for name, n in self.parts)


def build_footprint(config: T2VConfig, device, dtype=None, t5_cpu: bool = False, offload: str = "none"
                    ) -> Footprint:
    """What `from_config(config, device, dtype, t5_cpu, offload)` holds in host memory: everything
    on a CPU; else the text encoder with `t5_cpu`, the idle expert with offload 'model' (ti2v-5B's
    one model, during the VAE decode) and the DiT blocks with 'blocks'."""
    from .vae2_2 import vae_class

    on_cpu = torch.device(device).type == "cpu"
    parts = []
    n = len(config.dit_folders)  # two experts, or the one model of ti2v-5B
    if on_cpu or offload == "blocks":
        parts.append(("two experts" if n == 2 else "DiT", n * expert_bytes(config, dtype)))
    elif offload == "model":
        parts.append(("the idle expert" if n == 2 else "DiT", expert_bytes(config, dtype)))
    if on_cpu or t5_cpu:
        parts.append(("text encoder", text_encoder_bytes(config)))
    if on_cpu:
        parts.append(("VAE", _numel(lambda: vae_class(config.vae)(config.vae)) * 4))
    return Footprint(tuple(parts))


def expert_bytes(config: T2VConfig, dtype=None) -> int:
    """The bytes of one expert's weights in `dtype` (default: the config's param_dtype)."""
    from .dit import WanModel

    return _numel(lambda: WanModel(config.dit)) * torch.empty((), dtype=dtype or config.param_dtype).element_size()


def text_encoder_bytes(config: T2VConfig) -> int:
    """The bytes of the text encoder's weights (in the config's t5_dtype)."""
    from .t5 import T5Encoder

    return _numel(lambda: T5Encoder(config.t5)) * torch.empty((), dtype=config.t5_dtype).element_size()


def check_host_ram(config: T2VConfig, footprint: Footprint, device) -> None:
    """InputError (one line: what it needs, what is free) when the host cannot hold `footprint`.
    Silent when the free memory cannot be read."""
    need = footprint.total
    mem = hostmem.host_memory()
    if mem.available is None or need <= mem.available:
        return
    raise InputError(f"building {config.name} on {torch.device(device)} needs ~{need / 1e9:.1f} GB of host RAM "
                     f"({footprint.describe()}), and {mem.available / 1e9:.1f} GB is free ({mem.source})")
