"""Student CLAP: distil LAION-CLAP into small ONNX audio and text students."""

__version__ = "0.1.0"
