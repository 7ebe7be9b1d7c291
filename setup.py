from setuptools import find_packages, setup

setup(
    name="sslam-fast",
    version="0.1.0",
    description="Fast, faithful SSLAM / EAT audio self-supervised pretraining with Triton kernels",
    python_requires=">=3.9",
    # The kernels' source is kernels/sslam_kernels/: the top-level kernels/ folder is not itself a
    # package, so it never shadows another distribution's `kernels` (Hugging Face's, which
    # transformers 5 imports) when Python runs from a checkout (tests/test_layout_and_norm.py).
    packages=find_packages(include=["sslam_fast", "sslam_fast.*"]) + ["sslam_kernels"],
    package_dir={"sslam_fast": "sslam_fast", "sslam_kernels": "kernels/sslam_kernels"},
    package_data={"sslam_fast.released": ["audioset_classes.csv"]},
    # What `sslam-fast demo` and the trainer need is installed by `pip install .`: the trainer
    # runs on DeepSpeed (pure Python here; it builds no op at install), the demo draws with matplotlib.
    install_requires=[
        "torch>=2.4",
        "numpy",
        "soundfile",
        "tqdm",
        "safetensors",
        "deepspeed>=0.16",
        "matplotlib",
    ],
    extras_require={
        "triton": ["triton>=3.2"],
        "dali": ["nvidia-dali-cuda130"],
        "tensorboard": ["tensorboard"],
        "onnx": ["onnx", "onnxruntime"],
        "dev": [
            "pytest",
            "pytest-benchmark",
            "transformers",
            "tensorboard",
            "onnx",
            "onnxruntime",
            "scikit-learn",
        ],
        "demo": ["tensorboard"],
    },
    entry_points={"console_scripts": ["sslam-fast=sslam_fast.cli:main"]},
)
