"""aml: asymmetric teacher-student distillation for image retrieval."""

__version__ = "0.1.0"
