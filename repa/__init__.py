"""repa: a cloud-native training stack for REPA diffusion transformers.

REPA (Yu et al., ICLR 2025, "Representation Alignment for Generation") aligns the hidden states
of an early SiT block, through a small MLP projector, with the patch features of a frozen
pretrained visual encoder (DINOv2-B by default) computed on the clean image.
"""

__version__ = "0.1.0"
