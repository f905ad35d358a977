"""JanusFlow training: losses (AR, rectified flow, REPA), stage freezing, EMA, the loop, toy data."""
