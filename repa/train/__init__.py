"""Training: distributed set-up, checkpoints, metrics and the trainer loop (`repa train`)."""
