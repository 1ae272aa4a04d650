"""Format readers and writers, one module per format; pure functions where the format allows."""
