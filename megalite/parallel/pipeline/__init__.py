"""Pipeline parallelism: stages (which layers each rank holds), orders (which pass runs when, pure
Python), the simulator, the executor that runs an order with real messages, and timelines."""

__all__ = ["executor", "microbatch", "orders", "p2p", "schedules", "simulator", "stages", "timeline"]
