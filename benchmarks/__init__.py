"""megalite's benchmarks: each module times megalite against a peer in one run and prints the ratio.

They are a package, run from the repository's root as ``python -m benchmarks.<name>`` (for example
``python -m benchmarks.kernel_speed --quick``), so that no module here is ever found in place of an
installed distribution of the same name.
"""
