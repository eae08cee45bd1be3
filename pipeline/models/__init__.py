"""Neural networks: EfficientAT MobileNetV3, the audio student and the text student."""
