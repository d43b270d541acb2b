"""Training core: FLOP accounting and MFU, learning-rate schedules, and the loop that uses them."""
