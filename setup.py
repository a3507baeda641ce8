"""uda_plugins: domain-adaptive semantic segmentation as Detectron2 plugins.

Install:  pip install -c constraints.txt -e .[test]
Detectron2 itself is optional (it is not on PyPI): without it the builtin engine in uda_plugins/d2/builtin runs.
"""
from setuptools import find_packages, setup

setup(
    name="uda_plugins",
    version="0.1.0",
    description="Domain-adaptive semantic segmentation (DACS, DAFormer, HRDA, MIC, ...) as Detectron2 plugins",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["uda_plugins", "uda_plugins.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "timm>=1.0.9",
        "opencv-python-headless>=4.8",
        "numpy",
        "pillow",
        "tabulate",
        "tqdm",
        "tensorboard",
        "cityscapesscripts>=2.2",
    ],
    extras_require={"test": ["pytest>=7"]},
    license="Apache-2.0",
)
