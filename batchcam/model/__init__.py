"""The classifier: ResNet18, the checkpoint format (read without unpickling), normalisation."""
