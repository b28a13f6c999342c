"""What a catalogue holds: rows (`catalogue`), class paths (`hierarchy`), images (`images`), texts (`text`).
"""
