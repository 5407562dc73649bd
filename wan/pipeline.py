"""Two-expert Wan 2.2 text-to-video pipeline (placeholder: filled in by the pipeline work)."""
import torch


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond), float32."""
    return uncond + scale * (cond - uncond)
