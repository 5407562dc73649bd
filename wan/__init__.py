"""Pure-PyTorch reference of the Wan 2.2 stack: T2V-A14B, TI2V-5B, I2V-A14B (never imports triton).

Names are imported lazily so `import wan` stays cheap and free of side effects.
"""
import importlib

_EXPORTS = {
    "WanModel": "wan.dit",
    "DiTConfig": "wan.configs", "T5Config": "wan.configs", "VAEConfig": "wan.configs",
    "T2VConfig": "wan.configs", "TASKS": "wan.configs", "get_config": "wan.configs",
    "T5Encoder": "wan.t5", "WanVAE": "wan.vae",
    "FlowUniPCMultistepScheduler": "wan.schedulers", "FlowDPMSolverMultistepScheduler": "wan.schedulers",
    "WanT2V": "wan.pipeline", "WanTI2V": "wan.pipeline_ti2v", "WanI2V": "wan.pipeline_i2v",
    "Wan22VAE": "wan.vae2_2", "TI2VConfig": "wan.configs", "VAE22Config": "wan.configs",
    "load_image": "wan.image", "pipeline_class": "wan.tasks",
    "CheckpointError": "wan.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'wan' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
