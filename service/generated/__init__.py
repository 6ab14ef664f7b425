"""Python stubs generated from protos/ by `make protos`; do not edit the *_pb2*.py files.

They register their descriptors in this private pool rather than protobuf's default one, so
tserve's `inference.*` messages never clash with another copy of the same protocol loaded in
the same process (tritonclient ships its own generated grpc_service.proto).
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
