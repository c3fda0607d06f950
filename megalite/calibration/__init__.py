"""Measures this machine for the performance model of megalite/scaling/: GEMMs, the work outside
them, gloo collectives and the host's fixed cost, by running kernels and real training steps
(``python -m megalite.calibration.calibrate``).  It sits above training, which it runs."""
