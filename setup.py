import platform

from setuptools import find_packages, setup

# kernels/ installs as fastdreamer.kernels: a top-level module named `kernels` belongs to another package.
packages = find_packages(include=["fastdreamer", "fastdreamer.*"])
packages += ["fastdreamer.kernels"] + [f"fastdreamer.kernels.{p}" for p in find_packages("kernels")]
triton = ["triton>=3.0"] if platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64") else []

setup(
    name="fastdreamer",
    version="0.1.0",
    description="The fastest faithful DreamerV3 trainer on one GPU, in PyTorch.",
    python_requires=">=3.11",  # typing.Self; CI runs 3.11, the GPU bundle 3.12
    packages=packages,
    package_dir={"fastdreamer.kernels": "kernels"},
    install_requires=[
        "torch>=2.5",
        "numpy>=1.24",
        "gymnasium>=1.0",
        "envpool>=0.8.4",
        "tyro>=0.8",
        "tensorboard>=2.14",
        "tqdm>=4.66",
        "pillow>=10",
        *triton,
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.6.1", "pytest-benchmark>=4", "matplotlib>=3.7", "pygame>=2.1"],
        "plot": ["matplotlib>=3.7"],
        "video": ["pygame>=2.1"],  # Gymnasium's classic-control and Box2D renderers
    },
    entry_points={
        "console_scripts": [
            "fastdreamer-train=fastdreamer.train:main",
            "fastdreamer-eval=fastdreamer.eval:main",
        ]
    },
)
