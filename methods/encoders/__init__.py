"""Encoders and heads: backbones (torchvision, timm, the small convnet), projection and prediction
heads, BatchNorm arrangements, momentum encoders and their queues, and an encoder as files."""
