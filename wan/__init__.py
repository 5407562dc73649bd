"""Pure-PyTorch reference of the Wan 2.2 text-to-video stack (never imports triton).

Names are imported lazily so `import wan` stays cheap and free of side effects.
"""
import importlib

_EXPORTS = {
    "WanModel": "wan.dit",
    "DiTConfig": "wan.configs", "T5Config": "wan.configs", "VAEConfig": "wan.configs",
    "T2VConfig": "wan.configs", "TASKS": "wan.configs", "get_config": "wan.configs",
    "T5Encoder": "wan.t5", "WanVAE": "wan.vae",
    "FlowUniPCMultistepScheduler": "wan.schedulers", "FlowDPMSolverMultistepScheduler": "wan.schedulers",
    "WanT2V": "wan.pipeline",
    "CheckpointError": "wan.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'wan' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
