"""umT5-XXL text encoder (encoder only) of Wan 2.2, in pure PyTorch (checkpoint keys: docs/checkpoint.md).

`T5Encoder` has the official module names, so the official `models_t5_umt5-xxl-enc-bf16.pth`
(242 tensors) loads with `strict=True`. It computes, op by op in the same precision, what
the official `wan/modules/t5.py` computes, which equals HF `UMT5EncoderModel`
up to the softmax precision (the official softmax runs in fp32, HF's in the model dtype).

Per layer l (x in the model dtype, e.g. bf16; no Python loop over the batch):

    x = x + Wo( softmax32( (Wq h)(Wk h)^T + B_l ) (Wv h) ),   h = RMS1(x)   (no 1/sqrt(d))
    x = x + fc2( gelu_tanh(gate h) * fc1 h ),                 h = RMS2(x)
    out = RMS_final(x)

    RMS(x)  = w * cast_w( x * rsqrt(mean(float(x)^2) + eps) )
    B_l     = rel_bias_l[bucket(j - i)] (per head), key j masked (mask==0) -> finfo(dtype).min
    softmax32(z) = cast_dtype( softmax(float(z)) )
    gelu_tanh(x) = 0.5 x (1 + tanh( sqrt(2/pi) (x + 0.044715 x^3) ))   (element-wise, HF gelu_new)

`T5TextEncoder` is what the pipeline calls: tokenizer + cleaning + encoder, returning one
`[n_i, dim]` tensor per text, trimmed to its real length (incl. `</s>`).
The tiny task uses a byte-level tokenizer built in code (`byte_tokenizer()`), no files.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from .configs import T2VConfig, T5Config

__all__ = [
    "T5Encoder", "T5TextEncoder", "t5_rms_norm", "gelu_tanh", "relative_position_bucket",
    "clean_text", "byte_tokenizer", "hf_to_official", "UMT5_VOCAB_SIZE",
]

UMT5_VOCAB_SIZE = 256384  # the real umT5 vocab: needs the real tokenizer files
PAD_ID, EOS_ID, UNK_ID, BYTE_OFFSET = 0, 1, 2, 3  # built-in byte tokenizer: id = byte + 3


# --------------------------------------------------------------------------------------
# Element-wise pieces
# --------------------------------------------------------------------------------------

def t5_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5 RMS LayerNorm: w * cast_w( x * rsqrt(mean(float(x)^2) + eps) ).

    The mean is taken in fp32; x (model dtype) times the fp32 rsqrt promotes to fp32, which
    is rounded to the weight dtype before the multiply by w (same as HF `UMT5LayerNorm`).
    """
    y = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * y.to(weight.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written out so every op rounds in
    x's dtype (bit-identical to HF `gelu_new`; fused `F.gelu(approximate='tanh')` is not)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def relative_position_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of rel = key_pos - query_pos (int64 tensor).

    nb = num_buckets/2; bucket = nb*[rel > 0] + (a if a < nb/2 else
    min(nb-1, nb/2 + trunc( ln(a/(nb/2)) / ln(max_distance/(nb/2)) * nb/2 ))), a = |rel|,
    log in fp32, truncation toward zero.
    """
    nb = num_buckets // 2
    buckets = (rel > 0).long() * nb
    a = rel.abs()
    max_exact = nb // 2
    large = max_exact + (torch.log(a.float() / max_exact) / math.log(max_distance / max_exact)
                         * (nb - max_exact)).long()
    large = torch.clamp(large, max=nb - 1)
    return buckets + torch.where(a < max_exact, a, large)


# --------------------------------------------------------------------------------------
# Modules (official names)
# --------------------------------------------------------------------------------------

class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return t5_rms_norm(x, self.weight, self.eps)


class GELUTanh(nn.Module):
    def forward(self, x):
        return gelu_tanh(x)


class T5Attention(nn.Module):
    """Unscaled multi-head self-attention with an additive [B or 1, heads, L, L] bias."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        assert dim_attn % num_heads == 0
        self.num_heads, self.head_dim = num_heads, dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x, bias):
        b, n, c = x.size(0), self.num_heads, self.head_dim
        q = self.q(x).view(b, -1, n, c)
        k = self.k(x).view(b, -1, n, c)
        v = self.v(x).view(b, -1, n, c)
        attn = torch.einsum("binc,bjnc->bnij", q, k) + bias
        attn = torch.softmax(attn.float(), dim=-1).type_as(attn)
        x = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, -1, n * c)
        return self.o(x)


class T5FeedForward(nn.Module):
    """fc2( gelu_tanh(gate x) * fc1 x ); `gate` is Sequential(Linear, GELU) -> key `gate.0`."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GELUTanh())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gate(x))


class T5RelativeEmbedding(nn.Module):
    """Per-layer bias table [num_buckets, heads] -> bias [1, heads, Lq, Lk]."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int):
        dev = self.embedding.weight.device
        rel = torch.arange(lk, device=dev)[None, :] - torch.arange(lq, device=dev)[:, None]
        idx = relative_position_bucket(rel, self.num_buckets, self.max_distance)
        return self.embedding(idx).permute(2, 0, 1).unsqueeze(0)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = T5LayerNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = T5LayerNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(cfg.num_buckets, cfg.num_heads, cfg.max_distance)

    def forward(self, x, key_mask):
        """x [B,L,dim]; key_mask [B,1,1,L] bool (True = masked key) or None."""
        bias = self.pos_embedding(x.size(1), x.size(1)).to(x.dtype)
        if key_mask is not None:
            bias = bias.masked_fill(key_mask, torch.finfo(x.dtype).min)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class T5Encoder(nn.Module):
    """umT5 encoder with the official state-dict names (242 tensors at full size).

    forward(ids [B,L] int64, mask [B,L] (0 = padding) or None) -> [B, L, dim] in the
    parameter dtype. Padded query rows are computed (not zeroed); only keys are masked.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.norm = T5LayerNorm(config.dim, config.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        key_mask = None if mask is None else (mask == 0).view(mask.size(0), 1, 1, mask.size(1))
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "T5Encoder":
        """Official init, drawn in fp32 from `seed` then copied in (so the values do
        not depend on the dtype):
        RMS weights 1; token embedding N(0,1); gate/fc1 N(0, dim^-1/2), fc2 N(0, dim_ffn^-1/2);
        q N(0, (dim*dim_attn)^-1/2), k,v N(0, dim^-1/2), o N(0, (heads*dim_attn)^-1/2);
        relative bias N(0, (2*num_buckets*heads)^-1/2).
        """
        c = self.config
        dev = self.token_embedding.weight.device
        # drawn on the parameters' device: a full-size model on a GPU initialises in seconds
        # (CPU draws are the same on every CPU; CUDA draws differ from them, which is fine for random weights)
        gdev = dev if dev.type == "cuda" else torch.device("cpu")
        g = torch.Generator(device=gdev).manual_seed(seed)

        def normal_(p, std):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32, device=gdev).mul_(std))

        normal_(self.token_embedding.weight, 1.0)
        for blk in self.blocks:
            blk.norm1.weight.fill_(1.0)
            blk.norm2.weight.fill_(1.0)
            normal_(blk.attn.q.weight, (c.dim * c.dim_attn) ** -0.5)
            normal_(blk.attn.k.weight, c.dim ** -0.5)
            normal_(blk.attn.v.weight, c.dim ** -0.5)
            normal_(blk.attn.o.weight, (c.num_heads * c.dim_attn) ** -0.5)
            normal_(blk.pos_embedding.embedding.weight, (2 * c.num_buckets * c.num_heads) ** -0.5)
            normal_(blk.ffn.gate[0].weight, c.dim ** -0.5)
            normal_(blk.ffn.fc1.weight, c.dim ** -0.5)
            normal_(blk.ffn.fc2.weight, c.dim_ffn ** -0.5)
        self.norm.weight.fill_(1.0)
        return self


def hf_to_official(hf_state_dict: dict) -> dict:
    """Map an HF `UMT5EncoderModel` state dict to the official key names (docs/checkpoint.md)."""
    layer_map = {
        "layer.0.layer_norm.weight": "norm1.weight",
        "layer.0.SelfAttention.q.weight": "attn.q.weight",
        "layer.0.SelfAttention.k.weight": "attn.k.weight",
        "layer.0.SelfAttention.v.weight": "attn.v.weight",
        "layer.0.SelfAttention.o.weight": "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "layer.1.layer_norm.weight": "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
        "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
        "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    out = {}
    for k, v in hf_state_dict.items():
        if k in ("shared.weight", "encoder.embed_tokens.weight"):
            out["token_embedding.weight"] = v
        elif k == "encoder.final_layer_norm.weight":
            out["norm.weight"] = v
        elif k.startswith("encoder.block."):
            i, rest = k[len("encoder.block."):].split(".", 1)
            if rest not in layer_map:
                raise KeyError(f"unknown HF umT5 key {k}")
            out[f"blocks.{i}.{layer_map[rest]}"] = v
        else:
            raise KeyError(f"unknown HF umT5 key {k}")
    return out


# --------------------------------------------------------------------------------------
# Text cleaning and tokenizers
# --------------------------------------------------------------------------------------

def clean_text(text: str) -> str:
    """Official `clean='whitespace'`: ftfy.fix_text (default config), html.unescape twice,
    strip, regex `\\s+` -> ' ', strip."""
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer(model_max_length: int = 512):
    """Tokenizer for tiny tasks, built in code: ids pad=0 `<pad>`, eos=1 `</s>`, unk=2
    `<unk>`, then byte b -> b + 3 (259 ids); `</s>` is appended by the post-processor.
    A `transformers` fast tokenizer, so `save_pretrained` / `AutoTokenizer` work offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for b, ch in _byte_to_unicode().items():
        vocab[ch] = b + BYTE_OFFSET
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length)


def _load_tokenizer(folder):
    from .checkpoint import CheckpointError

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"missing tokenizer folder: {folder}")
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means unusable tokenizer files
        raise CheckpointError(f"cannot load tokenizer from {folder}: {type(err).__name__}: {err}") from None


# --------------------------------------------------------------------------------------
# What the pipeline calls
# --------------------------------------------------------------------------------------

class T5TextEncoder:
    """Tokenizer + cleaning + `T5Encoder`.

    `self(texts, device)` cleans and tokenizes (`padding='max_length'`, `truncation=True`,
    `max_length=text_len`, `</s>` appended), runs the encoder on the encoder's own device in
    its own dtype (no autocast, no grad) and returns a list of `[n_i, dim]` tensors,
    n_i = mask_i.sum(), moved to `device` (None: left where computed).
    """

    def __init__(self, tokenizer, model: T5Encoder, text_len: int):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.text_len = text_len

    # ---- properties / moves
    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.token_embedding.weight.dtype

    def to(self, device=None, dtype=None) -> "T5TextEncoder":
        self.model.to(device=device, dtype=dtype)
        return self

    # ---- encoding
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned texts -> (ids [B, text_len] int64, mask [B, text_len] int64) on CPU."""
        if isinstance(texts, str):
            texts = [texts]
        out = self.tokenizer([clean_text(t) for t in texts], return_tensors="pt", padding="max_length",
                             truncation=True, max_length=self.text_len, add_special_tokens=True)
        ids, mask = out["input_ids"], out["attention_mask"]
        vocab = self.model.config.vocab_size
        if ids.numel() and int(ids.max()) >= vocab:
            raise ValueError(f"tokenizer produced id {int(ids.max())} >= T5 vocab size {vocab}")
        return ids, mask

    def __call__(self, texts: Sequence[str], device=None) -> list[torch.Tensor]:
        ids, mask = self.tokenize(texts)
        lens = mask.gt(0).sum(dim=1).tolist()
        dev = self.device
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            out = self.model(ids.to(dev), mask.to(dev))
        return [u[:n] if device is None else u[:n].to(device) for u, n in zip(out, lens)]

    # ---- constructors / saving
    @classmethod
    def from_config(cls, config: T2VConfig, device="cpu", dtype=None, seed: int = 0,
                    tokenizer=None) -> "T5TextEncoder":
        """Random weights (official init from `seed`) in `dtype` (default config.t5_dtype).

        Tokenizer: `tokenizer` (an object or a folder path) if given; otherwise the built-in
        byte tokenizer, which is refused for the real umT5 vocab (it needs the real files).
        """
        cfg = config.t5
        if tokenizer is None:
            if cfg.vocab_size == UMT5_VOCAB_SIZE:
                raise ValueError(
                    f"task {config.name!r} uses the real umT5 vocabulary ({UMT5_VOCAB_SIZE}); the built-in "
                    f"byte tokenizer only serves tiny tasks. Pass tokenizer= (an object or the "
                    f"'{config.t5_tokenizer}' folder) or use T5TextEncoder.from_pretrained(ckpt_dir, config).")
            if cfg.vocab_size < 256 + BYTE_OFFSET:
                raise ValueError(f"T5 vocab {cfg.vocab_size} is too small for the byte tokenizer "
                                 f"(needs {256 + BYTE_OFFSET}); pass tokenizer=")
            tokenizer = byte_tokenizer(cfg.text_len)
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = _load_tokenizer(tokenizer)
        with torch.device("meta"):  # no default init, no fp32 copy of a bf16 model
            model = T5Encoder(cfg).to(dtype or config.t5_dtype)
        model = model.to_empty(device=device).init_weights(seed)
        return cls(tokenizer, model, cfg.text_len)

    @classmethod
    def from_pretrained(cls, ckpt_dir, config: T2VConfig, device="cpu", dtype=None) -> "T5TextEncoder":
        """Official layout: `<ckpt_dir>/<config.t5_checkpoint>` (torch.save'd state dict, loaded
        with mmap + weights_only) and the tokenizer folder `<ckpt_dir>/<config.t5_tokenizer>`.
        The module is built on `meta` and loaded with `assign=True`, cast to `dtype`
        (default config.t5_dtype). Raises CheckpointError naming the file/key on any mismatch."""
        from .checkpoint import load_pth, load_state_dict_into

        ckpt_dir = Path(ckpt_dir)
        path = ckpt_dir / config.t5_checkpoint
        sd = load_pth(path, device=device or "cpu")
        tokenizer = _load_tokenizer(ckpt_dir / config.t5_tokenizer)
        with torch.device("meta"):
            model = T5Encoder(config.t5)
        load_state_dict_into(model, sd, path, dtype=dtype or config.t5_dtype, device=device)
        return cls(tokenizer, model, config.t5.text_len)

    def save_pretrained(self, ckpt_dir, config: T2VConfig) -> None:
        """Write `<ckpt_dir>/<config.t5_checkpoint>` and the tokenizer folder (official layout)."""
        ckpt_dir = Path(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        torch.save(sd, ckpt_dir / config.t5_checkpoint)
        self.tokenizer.save_pretrained(str(ckpt_dir / config.t5_tokenizer))
