"""Stand-ins for libraries the tests cannot install (TensorRT, cuda-python), each headed by the API version it imitates."""
