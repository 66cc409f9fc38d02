from setuptools import setup

# `kernels/` and `cli.py` live at the top of the repository (the product card's layout) but install inside
# the `bayeskd` package, so `bayeskd` is the only new top-level import name.  bayeskd/cli.py is a symlink to
# ../cli.py, which works for wheels and editable installs alike.
setup(
    name="bayeskd",
    version="0.1.0",
    description="Bayesian estimation of a black-box LLM teacher's token distributions, and distillation from them",
    python_requires=">=3.10",
    packages=["bayeskd", "bayeskd.kernels", "bayeskd.teachers", "bayeskd.priors", "bayeskd.posterior",
              "bayeskd.distill", "bayeskd.evaluation", "bayeskd.lab"],
    package_dir={"bayeskd": "bayeskd", "bayeskd.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "numpy>=1.24",
        "scipy>=1.10",
        "datasets>=2.19",
        "triton>=3.0",
        "click>=8.1",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "tokenizers>=0.19",
        "accelerate>=1.1",  # transformers.Trainer needs it
        "trl>=1.0",  # DPOTrainer for proxy alignment (align-proxy)
        "openai>=1.50",  # bayeskd generate: the official SDK talks to OpenAI-compatible teachers
        "fastapi>=0.110",  # bayeskd serve-teacher
        "uvicorn>=0.29",
        "httpx>=0.27",
        "pydivsufsort>=0.0.20",  # the suffix prior's suffix array (estimate-prior --kind suffix)
        "numba>=0.60",  # the suffix prior's per-position query
    ],
    extras_require={
        "dev": ["pytest>=7", "nltk>=3.8", "matplotlib>=3.7", "psutil>=5.9", "pyarrow>=14", "hypothesis>=6.100"],
    },
    entry_points={"console_scripts": ["bayeskd = bayeskd.cli:main"]},
)
