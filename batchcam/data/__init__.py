"""Package data: the bundled demo checkpoint (demo_model.pt) and its training card."""
