"""Files to samples: which files are candidates, bounded reading, faithful grayscale decoding
(Pillow formats and DICOM), the model view, display copy and lung-field estimate of each image."""
