"""wan-triton: Wan 2.2 text-to-video with fused Triton kernels, faithful to the official model."""
import sys

from setuptools import find_packages, setup

install_requires = [
    "torch>=2.4",
    "einops",
    "transformers",
    "tokenizers",
    "sentencepiece",
    "ftfy",
    "regex",
    "safetensors",
    "imageio",
    "imageio-ffmpeg",
    "tqdm",
    "numpy",
    "pillow",  # input images of the image-conditioned tasks (ti2v-5B, i2v-A14B)
]
# Triton ships wheels for Linux only; elsewhere the kernels fall back to PyTorch.
if sys.platform.startswith("linux"):
    install_requires.append("triton")

setup(
    name="wan-triton",
    version="0.1.0",
    description="Fast, faithful Wan 2.2 T2V-A14B inference: fused Triton kernels over a reference PyTorch stack",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The installed import names are ours alone: `wan` and `wan_triton` (the Triton kernels are
    # `wan_triton.kernels`; a top-level `kernels` is Hugging Face's, and `bench` is a PyPI name).
    # The scripts in bench/ run from a clone (python -m bench.<name>) and are not installed.
    packages=find_packages(include=["wan", "wan.*", "wan_triton", "wan_triton.*"]),
    # the demo model's weights (wan/demo_model: official layout, ~14 MB), the default of wan-generate
    package_data={"wan": ["demo_model/**/*"]},
    install_requires=install_requires,
    extras_require={
        # diffusers: so that the test command runs tests/test_diffusers.py (without it they skip); cache-dit:
        # tests/test_cache_dit.py (patch() composed with its step cache; it needs diffusers >= 0.36, torch >= 2.7.1)
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "matplotlib", "diffusers>=0.35.0,<0.43", "cache-dit"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "flash": ["flash-attn"],
        "fa4": ["flash-attn-4"],                  # CUDA 13 torch: pip install "flash-attn-4[cu13]"
        "fp8-attention": ["nvidia-cudnn-frontend"],
        # wan_triton.patch(WanPipeline / WanTransformer3DModel): the range wan_triton/diffusers.py supports
        "diffusers": ["diffusers>=0.35.0,<0.43"],
    },
    # wan_triton.console imports the tools inside a guard: Ctrl-C during their imports is one line, exit 130
    entry_points={"console_scripts": ["wan-generate = wan_triton.console:generate",
                                      "wan-benchmark = wan_triton.console:benchmark"]},
)
