"""Encoders and vision models as products: what a model is for (roles.py), text in (text.py),
images in (vision.py), and the same tasks over KServe v2 tensors (tensors.py). The data plane's
task road (DataPlane.run_task) runs them; the HTTP routes (http/openai.py, http/tei.py) and
ModelInfer with BYTES tensors are its callers."""
