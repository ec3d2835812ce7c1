"""Tools that make reward models: train heads, upcycle, merge, calibrate."""
