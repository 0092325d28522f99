"""dicomflow: Cloud Storage to Cloud Healthcare API DICOM store, batched and checked."""

__version__ = "0.1.0"
