"""`huse eval`: the evaluation run (`evaluate`) and its HTML report (`report`).
"""
