"""Generated protobuf modules (committed; see scripts/gen_proto.py)."""
