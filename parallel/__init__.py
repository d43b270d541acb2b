"""Everything about distributing work: topology, TP/PP/CP/DP, ZeRO, balancing, loading."""
