"""huse-pipeline: Hierarchical Universal Semantic Embeddings (arXiv:1911.05978) as a two-stage
feature-cache pipeline: frozen encoders -> HDF5 cache -> HUSE towers -> evaluation."""

__version__ = "0.1.0"
