"""Small DICOM films with chosen tags and elements, for the DICOM tests (pydicom needed)."""
from __future__ import annotations

import io

import numpy as np


def dx_dataset():
    """An empty DX (for presentation) data set with its file meta, explicit VR little endian."""
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

    return empty_dataset(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)


def empty_dataset(sop_class_uid, transfer_syntax):
    """An empty data set of ``sop_class_uid`` with its file meta, in ``transfer_syntax``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    return ds


def dicom_film(**tags) -> bytes:
    """A small 12-bit MONOCHROME2 film with the given tags (Modality, BodyPartExamined, ViewPosition)."""
    ds = dx_dataset()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    y, x = np.mgrid[0:96, 0:80]
    pixels = ((np.sin(x / 6.0) * np.cos(y / 9.0) + 1) * 2000).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
