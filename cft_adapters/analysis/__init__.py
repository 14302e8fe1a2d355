"""Analysis: predict forgetting before training (DES, MPD), locate it after (drift), and the
statistics to trust a comparison across seeds."""
