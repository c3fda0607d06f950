"""The training loop (loop.py) and what it reads and writes: the arguments, the batch schedule, the
metrics line and its writers, profiling and the exit conditions."""
