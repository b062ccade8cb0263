"""batchcam: batch predictions and Grad-CAM explanations over folders of chest X-rays."""
import os

# Idle OpenMP threads sleep instead of spinning: in a scan the model's threads share the cores with
# decoding workers and overlay threads, which spinning would starve.
# Set before torch is first imported; a caller that imported torch earlier keeps its own policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
