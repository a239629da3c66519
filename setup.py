"""t2i: a JAX/Flax training stack for text-to-image models."""
from setuptools import find_packages, setup

setup(
    name="t2i",
    version="0.1.0",
    description="JAX/Flax training stack for text-to-image models",
    python_requires=">=3.11",
    packages=find_packages(include=["t2i*", "data_pipelines*", "launch*", "experiments*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "grain",
        "array_record",
        "tensorflow-datasets",
        "importlib_resources",
        "ml_collections",
        "absl-py",
        "numpy",
        "pillow",
        "transformers>=4.50",
        "tokenizers",
        "safetensors",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        # PyTorch references for parity tests and benchmarks only.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "diffusers", "scipy", "sentencepiece", "protobuf"],
    },
)
