"""Graph conventions: one module owns the names, shapes and feeds of each kind of graph tserve
drives itself (today the decoder-with-past; the encoder-decoder joins here)."""
