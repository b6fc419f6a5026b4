"""Packaging for flex_surgery.

The torch range is deliberately wide: users bring the torch build that matches their cluster
(CUDA, ROCm, CPU). The pinned, CPU-only environment used by `make` lives in requirements.txt.
"""

from setuptools import find_packages, setup

setup(
    name="flex_surgery",
    version="0.1.0",
    description=(
        "Distributed interpretability and model-surgery runtime for sharded PyTorch models"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["flex_surgery", "flex_surgery.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis", "transformers>=4.40", "fairscale"],
        "examples": ["transformers>=4.40", "fairscale", "submitit", "tqdm", "matplotlib",
                     "accelerate", "gguf"],
        "launch": ["submitit"],
        "docs": ["sphinx", "myst-parser"],
    },
    entry_points={"console_scripts": ["flex-surgery=flex_surgery.__main__:main"]},
)
