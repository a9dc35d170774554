"""From NIfTI/DICOM to WebDataset shards and back to tensors."""
