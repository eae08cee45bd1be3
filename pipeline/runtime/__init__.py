"""What runs on small machines: onnxruntime, numpy and soundfile only, never torch."""
