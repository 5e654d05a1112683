"""gansteer: a Python client for steering pretrained image generators through gansteer's gRPC services.

The services generate images from registered generators, score images with classifiers, discriminators and
simulated interaction objectives, and run long optimisation jobs (inversion of a target image, embedding
activation maximisation, latent search, PIR tuning, interactive evolution). This package holds the wire protocol
(`gansteer.v1`) and the helpers that convert numpy arrays and images to and from it (`gansteer.tensors`); it never
depends on torch.
"""

__version__ = "0.1.0"
