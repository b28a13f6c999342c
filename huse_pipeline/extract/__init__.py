"""Stage one: the row-range plan (`plan`), the extraction run (`run`) and the semantic graph (`graph`).
"""
