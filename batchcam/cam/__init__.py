"""Class activation maps: the forward pass with the exact Grad-CAM (or pytorch-grad-cam), and
overlays rendered from the raw maps."""
