"""gRPC servicers: translate protobuf <-> domain objects and await one data-plane call."""
