"""starfish_fast: heal pruned networks with STARFISH, fast. `pip install -e .[dev]`."""
import re
from pathlib import Path

from setuptools import setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("starfish_fast/__init__.py").read_text()).group(1)

setup(
    name="starfish_fast",
    version=VERSION,
    description="PyTorch + Triton engine that heals pruned networks with STARFISH block-wise cosine alignment",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ is installed as starfish_fast.kernels: PyPI already has a top-level package named `kernels`.
    packages=["starfish_fast", "starfish_fast.models", "starfish_fast.prune", "starfish_fast.kernels"],
    package_dir={"starfish_fast": "starfish_fast", "starfish_fast.kernels": "kernels"},
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
        "dev": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.6"],
        "plot": ["matplotlib>=3.6"],
        "hf": ["datasets>=2.14"],
    },
    entry_points={"console_scripts": ["starfish-fast=starfish_fast.cli:main"]},
)
