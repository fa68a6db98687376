"""Optional integrations with other training stacks (each module imports its framework lazily).

- `integrations.lightning.NeuralMechanicsCallback`: the Tracker inside a PyTorch Lightning Trainer
  (needs `lightning` or `pytorch_lightning`);
- `integrations.tensorboard`: per-layer aggregates of a run as TensorBoard scalars (needs `tensorboard`).
"""
