"""FLOPs per image for SiT and ViT encoders, and model FLOPs utilisation (MFU).

Counting convention (as in the PaLM paper, appendix B, and nanoGPT's ``estimate_mfu``): one
multiply-accumulate = 2 FLOPs; only matrix multiplications are counted (norms, activations,
softmax and the elementwise adaLN modulation are a few percent and left out). A training step
costs 3x the forward FLOPs of the trained network (forward + backward for activations and
weights) plus 1x the forward FLOPs of each frozen encoder (no backward).
"""

from __future__ import annotations

# Dense (non-sparse) peak tensor-core throughput in FLOP/s by device-name fragment, for bf16/fp16.
# Sources: NVIDIA data sheets (H100 SXM5 / H200 SXM: 989.4 TF; H100 PCIe: 756 TF; A100: 312 TF;
# L40S: 362 TF; L4: 121 TF; A10/A10G: 125 TF). Matching is by substring of
# torch.cuda.get_device_name(); unknown devices report no MFU rather than a wrong one.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989.4e12,
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}


def transformer_block_flops(tokens: int, hidden: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one pre-norm attention + MLP block on ``tokens`` tokens of width ``hidden``."""
    qkv = 2 * tokens * hidden * 3 * hidden
    scores = 2 * tokens * tokens * hidden  # Q K^T
    mix = 2 * tokens * tokens * hidden  # softmax(.) V
    proj = 2 * tokens * hidden * hidden
    mlp = 2 * 2 * tokens * hidden * int(hidden * mlp_ratio)
    return float(qkv + scores + mix + proj + mlp)


def sit_forward_flops(
    *,
    input_size: int,
    patch_size: int,
    in_channels: int,
    hidden_size: int,
    depth: int,
    mlp_ratio: float = 4.0,
    z_dims: tuple[int, ...] | list[int] = (),
    projector_dim: int = 2048,
) -> float:
    """Forward FLOPs of SiT for one image (latent ``in_channels x input_size^2``)."""
    tokens = (input_size // patch_size) ** 2
    patch = patch_size * patch_size * in_channels
    embed = 2 * tokens * patch * hidden_size
    blocks = depth * (
        transformer_block_flops(tokens, hidden_size, mlp_ratio) + 2 * hidden_size * 6 * hidden_size
    )
    final = 2 * tokens * hidden_size * patch + 2 * hidden_size * 2 * hidden_size
    projectors = sum(
        2 * tokens * (hidden_size * projector_dim + projector_dim * projector_dim + projector_dim * z)
        for z in z_dims
    )
    return float(embed + blocks + final + projectors)


def vit_forward_flops(
    *,
    image_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    mlp_ratio: float = 4.0,
    prefix_tokens: int = 1,
) -> float:
    """Forward FLOPs of a ViT encoder on one ``image_size^2`` RGB image."""
    grid_tokens = (image_size // patch_size) ** 2
    tokens = grid_tokens + prefix_tokens
    embed = 2 * grid_tokens * patch_size * patch_size * 3 * embed_dim
    return float(embed + depth * transformer_block_flops(tokens, embed_dim, mlp_ratio))


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device, or None if unknown (then MFU is not reported)."""
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in device_name:
            return flops
    return None


def mfu(flops_per_image: float, images_per_second: float, num_devices: int, device_name: str) -> float | None:
    """Achieved model FLOP/s over the devices' peak: ``flops_per_image * img/s / (peak * devices)``."""
    peak = peak_flops(device_name)
    if peak is None or images_per_second <= 0:
        return None
    return flops_per_image * images_per_second / (peak * num_devices)
