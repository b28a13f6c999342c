"""Stage one's frozen encoders: `image` (ImageNet CNNs), `text` (sentence-transformers).
"""
