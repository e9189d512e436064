"""Trust on the control plane: join and operator tokens, signed session credentials, replay and rate
limits, and TLS material. The gRPC servicer asks `guard.RequestGuard` about every call; nothing here
knows gRPC or the round machinery, so each rule is tested on its own."""
