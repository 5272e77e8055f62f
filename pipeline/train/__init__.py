"""Training: features, model, loop and stopping rule."""
