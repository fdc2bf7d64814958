"""Training and evaluation data: dataset readers, the synthetic generator, training pairs."""
