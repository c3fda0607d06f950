"""Fixtures shared across test folders."""

# The CPU kernel-table fixtures (cpu_isa, native_isa, output_stores) serve the norm and Adam tests.
pytest_plugins = ["tests.ops.kernel_tables"]
