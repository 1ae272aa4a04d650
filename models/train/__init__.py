"""Training C2P: loss, augmentation, semantic targets, the data cache and the trainer."""
