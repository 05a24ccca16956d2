"""Export of student query encoders (ONNX / TorchScript, fp32 / fp16 / int8), verified before writing.

Kept import-free: `aml.export.sidecar` is read on the torch-free `aml embed` path.
"""
