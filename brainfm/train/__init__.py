"""One Accelerate training loop for both pretraining stages, with atomic checkpoints and guards."""
