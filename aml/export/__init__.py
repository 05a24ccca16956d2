"""Export of student query encoders (ONNX / TorchScript, fp32 / fp16 / int8), verified before writing.

The sidecar format, `FORMATS` and `PRECISIONS` live in the torch-free `aml.sidecar` (read by `aml embed`).
"""
