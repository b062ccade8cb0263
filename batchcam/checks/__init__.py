"""Checks of the explanations and the predictions: attention off the lungs, faithfulness,
classification metrics, localisation against boxes, the model-randomisation sanity check."""
