from setuptools import find_packages, setup

setup(
    name="sslam-fast",
    version="0.1.0",
    description="Fast, faithful SSLAM / EAT audio self-supervised pretraining with Triton kernels",
    python_requires=">=3.9",
    packages=find_packages(include=["sslam_fast", "sslam_fast.*"]) + ["sslam_kernels"],
    package_dir={"sslam_fast": "sslam_fast", "sslam_kernels": "kernels"},
    package_data={"sslam_fast.released": ["audioset_classes.csv"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "soundfile",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        "triton": ["triton>=3.2"],
        "dali": ["nvidia-dali-cuda130"],
        "deepspeed": ["deepspeed>=0.16"],
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
            "matplotlib",
        ],
        "demo": ["matplotlib", "tensorboard"],
    },
    entry_points={"console_scripts": ["sslam-fast=sslam_fast.cli:main"]},
)
