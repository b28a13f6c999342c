"""huse-pipeline: Hierarchical Universal Semantic Embeddings (arXiv:1911.05978) as a two-stage
feature-cache pipeline: frozen encoders -> HDF5 cache -> HUSE towers -> evaluation."""

__version__ = "0.1.0"
DEFAULT_FEATURES = "cache/feats.h5"  # the feature file every command writes or reads unless told otherwise
