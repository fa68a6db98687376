"""Models (the paper's VGG-16 variants and presets), model specs, datasets, configs and the training loop."""
