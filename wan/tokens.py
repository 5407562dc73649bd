"""Per-token timesteps, embedded once per distinct value (docs/models.md, "Per-token timesteps").

The image-conditioned TI2V path gives its tokens two timesteps: the first latent frame (the
image) at t = 0, every other token (padding included) at t. The official model embeds a timestep
per token: e [B, L, C] and a modulation e0 [B, L, 6, C] in fp32 (2.0 GB at 1280x704x121 for the
5B). Here the K distinct values are embedded once (e [K, C], e0 [K, 6, C]) and every token
carries the index of its row; the modulation ops read row index[b, l] for token (b, l). The
values a token sees are the official ones (the same rows; only the fp32 GEMM that makes them
runs with K rows instead of L, which can move the last ulp, as the one-row-per-sample T2V path
already does).

    TokenTimesteps(values [K], index [B or 1, L])   what a caller passes as `t`
    TokenRows(rows [K, ...], index [B, L])           what the blocks and the head receive
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TokenTimesteps", "TokenRows", "timesteps_to_embed"]


@dataclass(frozen=True)
class TokenTimesteps:
    """Timesteps per token: token (b, l) is at `values[index[b, l]]`. `index` has one row for
    the whole batch ([1, L]) or one per sample ([B, L]); it is int32."""
    values: torch.Tensor   # [K] timesteps
    index: torch.Tensor    # [1 or B, L] int32, entries in [0, K)

    @classmethod
    def from_dense(cls, t: torch.Tensor) -> "TokenTimesteps":
        """From the official form, one timestep per token [B, L] (values sorted; syncs with the device)."""
        if t.dim() != 2:
            raise ValueError(f"per-token timesteps must be [B, L], got {tuple(t.shape)}")
        values, index = torch.unique(t, return_inverse=True)
        return cls(values, index.to(torch.int32))

    @classmethod
    def first_frame(cls, t: torch.Tensor, frame_tokens: int, seq_len: int) -> "TokenTimesteps":
        """The TI2V image mode: the first `frame_tokens` tokens at 0 (the given first frame), the
        other `seq_len - frame_tokens` (the rest of the video and the padding) at `t`."""
        t = torch.as_tensor(t).reshape(())
        if not 0 < frame_tokens <= seq_len:
            raise ValueError(f"frame_tokens must be in (0, {seq_len}], got {frame_tokens}")
        index = torch.ones(1, seq_len, dtype=torch.int32, device=t.device)
        index[:, :frame_tokens] = 0
        return cls(torch.stack([torch.zeros_like(t), t]), index)

    def dense(self) -> torch.Tensor:
        """The official form [1 or B, L]: each token's own timestep."""
        return self.values[self.index.long()]


@dataclass(frozen=True)
class TokenRows:
    """Rows of a table, selected per token: token (b, l) takes `rows[index[b, l]]`."""
    rows: torch.Tensor     # [K, ...]
    index: torch.Tensor    # [B, L] int32

    def gather(self) -> torch.Tensor:
        """[B, L, ...]: every token's row (what the official model holds per token)."""
        return self.rows[self.index.long()]


def timesteps_to_embed(t, batch: int, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, index) of a model call's `t`: one timestep per sample (values [B], index None),
    or per token (`t` [B, tokens] in the official form, or a TokenTimesteps): the K distinct
    values [K] and the index [1 or B, tokens]. Per-token timesteps that are all equal take the
    first form (the T2V path)."""
    if not isinstance(t, TokenTimesteps):
        t = torch.as_tensor(t, device=device)
        if t.dim() == 2:
            t = TokenTimesteps.from_dense(t)
    if isinstance(t, TokenTimesteps):
        idx = t.index.to(device)
        if idx.dim() != 2 or idx.shape[0] not in (1, batch) or idx.shape[1] != tokens:
            raise ValueError(f"per-token timesteps must cover [{batch}, {tokens}] tokens, got {tuple(idx.shape)}")
        if t.values.numel() > 1:
            return t.values.to(device), idx
        t = t.values.to(device).reshape(())
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must hold one timestep per sample, shape [{batch}], got {tuple(t.shape)}")
    return t, None
