"""t5x_lite: T5-style text-to-text transformers in JAX/Flax, from one CPU to a pod.

Exact versions of every dependency are pinned in constraints.txt (Python 3.11):
    pip install -c constraints.txt -e '.[test]'
"""
import setuptools

setuptools.setup(
    name="t5x_lite",
    version="0.1.0",
    description="T5-style text-to-text transformers in JAX/Flax: model, partitioning, training, evaluation.",
    packages=setuptools.find_packages(include=["t5x_lite", "t5x_lite.*", "tasks", "tasks.*"]),
    package_data={"tasks": ["templates/*.yaml"]},
    python_requires=">=3.11",
    install_requires=[
        "jax",
        "jaxlib",
        "flax",
        "optax",
        "orbax-checkpoint",
        "seqio",
        "tensorflow",
        "tensorflow-text",
        "tensorflow-datasets",
        "tensorboard",
        "gin-config",
        "sentencepiece",
        "numpy",
        "tqdm",
        "matplotlib",
        "jinja2",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis"],
        # JAX's CUDA 12 build; install on a GPU machine with `pip install -e '.[gpu]'`.
        "gpu": ["jax[cuda12]"],
        # scripts/benchmark.py --against hf: transformers' T5 in PyTorch on the CPU. Only that script imports them.
        # On a machine with a GPU, install torch's CPU build first (pip's default there is a CUDA build).
        "bench": ["torch==2.13.0", "transformers"],
    },
)
