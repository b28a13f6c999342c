"""The measures, pure functions of embeddings: metrics (paper §4.3-4.5), exact chunked retrieval, metric keys.
"""
