"""The coordinator: membership, rounds, the run's global state, and the gRPC service around them."""
