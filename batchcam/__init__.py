"""batchcam: batch predictions and Grad-CAM explanations over folders of chest X-rays."""

__version__ = "0.1.0"
