"""SiT: a DiT backbone (adaLN-Zero) trained as a flow model, with REPA's projector heads.

Reads top to bottom, like facebookresearch/DiT ``models.py``:

    modulate | Timestep/LabelEmbedder | SiTBlock, FinalLayer, build_mlp | SiT | pos-embed | SiT_models

Numerics and state-dict names follow the official REPA ``models/sit.py`` (sihyun-yu/REPA @ 67f7145,
), so its checkpoints load with ``strict=True``:

- t in [0, 1] is embedded as is (no x1000 as in DiT), 256 frequencies ordered ``[cos, sin]``;
- the null label is ``num_classes``; labels are dropped (for classifier-free guidance) in train mode only;
- REPA's projector MLP reads the output of block ``encoder_depth`` (1-based), token-wise;
- the model predicts the velocity only (``in_channels`` outputs, no learned sigma).

Differences from the reference, each a fix: SiT-S works (the reference passes no ``decoder_hidden_size``
for S, so its final layer has the wrong width); ``encoder_depth > depth`` is a ValueError (the reference
hits a NameError); bad input shapes are ValueErrors naming the expected shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention

from repa.models.sizes import SIT_SIZES


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine of token features; ``x`` (B, T, D), ``shift``/``scale`` (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding layers for timesteps and class labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds scalar times t in [0, 1] (fed unscaled, as the reference) into ``hidden_size`` vectors."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal features ``[cos(t w_i), sin(t w_i)]``, ``w_i = max_period^(-i/half)`` (GLIDE, DiT).

        The order ``[cos, sin]`` matters: checkpoints trained with it do not work with ``[sin, cos]``.
        """
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None].to(t.device)  # (B, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(t.dtype)  # (B, 256)
        return self.mlp(t_freq)  # (B, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; in train mode replaces a label by the null id with prob ``dropout_prob`` (CFG).

    The table has ``num_classes + 1`` rows when a null label exists (``dropout_prob > 0`` or ``use_cfg``);
    its id is ``num_classes``. (The reference adds the row only for ``dropout_prob > 0``; its train.py
    always builds SiT with 0.1, so every official checkpoint has the extra row either way.)
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, use_cfg: bool = True) -> None:
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0 or use_cfg)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Label dropout: one ``torch.rand(B)`` draw (as the reference, so RNG streams stay aligned)."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (B, D)


#################################################################################
#                                 Core SiT Model                                #
#################################################################################


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: gated attention and MLP residuals (DiT Fig. 3)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        fused_attn: bool = True,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # norm_layer: timm < 1.0 defaulted it to nn.LayerNorm (what the reference's qk_norm=True used);
        # newer timm asserts it is given when qk_norm is set.
        self.attn = Attention(
            hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm
        )
        self.attn.fused_attn = fused_attn  # True: torch SDPA; False: explicit softmax(QK^T)V
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=partial(nn.GELU, approximate="tanh"),
            drop=0,
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=-1
        )  # 6 x (B, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm + linear map from tokens to patches of ``out_channels``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x (B, D)
        x = modulate(self.norm_final(x), shift, scale)  # (B, T, D)
        return self.linear(x)  # (B, T, p*p*C)


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector h_phi (REPA §3.2): Linear(h, pd) - SiLU - Linear(pd, pd) - SiLU - Linear(pd, z)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class SiT(nn.Module):
    """Scalable Interpolant Transformer with REPA projectors.

    ``forward(x, t, y) -> (v, zs)``: ``x`` (B, C, H, W) noisy latents, ``t`` (B,) times in [0, 1]
    (t=0 data, t=1 noise), ``y`` (B,) int labels (``null_class`` = unconditional). ``v`` (B, C, H, W) is the
    predicted velocity; ``zs`` is a list with one (B, T, z_dims[i]) tensor per projector, the projection of
    the hidden tokens after block ``encoder_depth`` (1-based). ``encoder_depth=0`` or empty ``z_dims``
    builds no projector (vanilla SiT, ``zs == []``).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        encoder_depth: int = 8,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        use_cfg: bool = True,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        fused_attn: bool = True,
        qk_norm: bool = False,
    ) -> None:
        super().__init__()
        z_dims = tuple(int(z) for z in z_dims)
        _check_args(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            encoder_depth=encoder_depth,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            z_dims=z_dims,
            projector_dim=projector_dim,
        )
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels  # velocity only: no learned sigma channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.z_dims = z_dims if encoder_depth > 0 else ()

        # Module creation order matches the reference, so a seeded init draws the same numbers.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, use_cfg)
        num_patches = self.x_embedder.num_patches
        # Fixed 2-D sin-cos table; a Parameter (not a buffer) only so state-dict names match the reference.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio, fused_attn, qk_norm) for _ in range(depth)]
        )
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Label id meaning "no class" (classifier-free guidance); samplers must use this, not 1000."""
        return self.num_classes

    def initialize_weights(self) -> None:
        """DiT init. adaLN-Zero: modulation and output layers start at 0, so every block is the identity
        and the model outputs exactly 0 at init (DiT §3.2)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        grid_size = int(self.x_embedder.num_patches**0.5)
        pos_embed = get_2d_sincos_pos_embed(self.hidden_size, grid_size)
        self.pos_embed.data.copy_(pos_embed.float().unsqueeze(0))

        # Patch embedding: xavier on the flattened conv weight, as for a Linear.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) tokens -> (B, C, H, W) image, T = (H/p) * (W/p)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (B, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (B, C, H, W)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D), T = (H/p)*(W/p)
        B, T, D = x.shape
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (B, D)
        zs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x, c)  # (B, T, D)
            if i + 1 == self.encoder_depth:  # REPA tap: output of block `encoder_depth` (1-based)
                zs = [proj(x.reshape(-1, D)).reshape(B, T, -1) for proj in self.projectors]  # (B, T, z_i)
        x = self.final_layer(x, c)  # (B, T, p*p*C)
        x = self.unpatchify(x)  # (B, C, H, W)
        return x, zs

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            want = ", ".join(map(str, expected))
            raise ValueError(f"SiT input x: expected shape (B, {want}), got {tuple(x.shape)}")
        B = x.shape[0]
        if tuple(t.shape) != (B,):
            raise ValueError(
                f"SiT input t: expected shape ({B},) (one time per sample), got {tuple(t.shape)}"
            )
        if tuple(y.shape) != (B,):
            raise ValueError(
                f"SiT input y: expected shape ({B},) (one label per sample), got {tuple(y.shape)}"
            )
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"SiT input y: expected integer class ids, got dtype {y.dtype}")


def _check_args(
    *,
    input_size: int,
    patch_size: int,
    in_channels: int,
    hidden_size: int,
    encoder_depth: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    class_dropout_prob: float,
    num_classes: int,
    z_dims: tuple[int, ...],
    projector_dim: int,
) -> None:
    """Constructor checks: each failure names the argument, the value and the rule."""
    for name, value in [
        ("input_size", input_size),
        ("patch_size", patch_size),
        ("in_channels", in_channels),
        ("hidden_size", hidden_size),
        ("depth", depth),
        ("num_heads", num_heads),
        ("num_classes", num_classes),
        ("projector_dim", projector_dim),
    ]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"SiT {name}={value!r}: must be a positive integer")
    if input_size % patch_size:
        raise ValueError(f"SiT input_size={input_size} is not divisible by patch_size={patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"SiT hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if not 0 <= encoder_depth <= depth:
        raise ValueError(
            f"SiT encoder_depth={encoder_depth} must be in [0, depth={depth}] (1-based block whose output "
            "is aligned; 0 = no projector)"
        )
    if mlp_ratio <= 0:
        raise ValueError(f"SiT mlp_ratio={mlp_ratio} must be > 0")
    if not 0 <= class_dropout_prob < 1:
        raise ValueError(f"SiT class_dropout_prob={class_dropout_prob} must be in [0, 1)")
    if any(z < 1 for z in z_dims):
        raise ValueError(f"SiT z_dims={list(z_dims)}: every entry must be a positive integer")


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# Adapted from MAE (facebookresearch/mae, util/pos_embed.py); computed in float64 as MAE does in numpy.


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, embed_dim) table, tokens in row-major order.

    As in MAE, the first half encodes the column index and the second half the row index (MAE names
    them ``emb_h``/``emb_w`` but feeds ``meshgrid(grid_w, grid_h)[0]``, the column, to the first).
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    col, row = torch.meshgrid(coords, coords, indexing="xy")  # (G, G) each; col[i, j] = j, row[i, j] = i
    emb_first = get_1d_sincos_pos_embed(embed_dim // 2, col.reshape(-1))  # (G*G, D/2)
    emb_second = get_1d_sincos_pos_embed(embed_dim // 2, row.reshape(-1))  # (G*G, D/2)
    return torch.cat([emb_first, emb_second], dim=1)  # (G*G, D)


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[sin(pos w_i), cos(pos w_i)]`` with ``w_i = 1 / 10000^(2i/D)``; ``pos`` (M,) -> (M, D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even width, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = pos.double()[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


#################################################################################
#                                   SiT Configs                                 #
#################################################################################

# "SiT-XL/2" -> constructor with that size and patch (repa.models.sizes); keyword arguments override.
SiT_models = {name: partial(SiT, **size) for name, size in SIT_SIZES.items()}


def build_model(name: str, **overrides) -> SiT:
    """Build ``SiT_models[name]`` with keyword ``overrides`` (e.g. ``encoder_depth=4, z_dims=(768,)``)."""
    if name not in SiT_models:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(SiT_models)}")
    return SiT_models[name](**overrides)


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameter count; by default includes the frozen ``pos_embed`` (as the reference's counts do)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
