"""HTTP front ends on the data plane: KServe v2 (service/http/kserve.py) and an OpenAI-compatible
API (service/http/openai.py), served by uvicorn in the gRPC server's event loop."""
