"""Kernels the model's forward calls: attention for packed rows and the chunked loss."""
