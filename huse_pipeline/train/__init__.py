"""Stage two: settings (`config`), the model and losses, batch sources, the loop and the run folder.
"""
