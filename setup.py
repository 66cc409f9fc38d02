from setuptools import find_packages, setup

# `bayeskd` is the only import name the repository root and an install add: the kernels and the CLI live inside
# the package (bayeskd/kernels/, bayeskd/cli.py), since a top-level `kernels` shadows Hugging Face's `kernels`
# package, which transformers imports (docs/ARCHITECTURE.md).  The versions CI and the README's install were
# tested with are pinned in constraints.txt; the ranges below stay open for library users.
setup(
    name="bayeskd",
    version="0.1.0",
    description="Bayesian estimation of a black-box LLM teacher's token distributions, and distillation from them",
    python_requires=">=3.10",
    packages=find_packages(include=["bayeskd", "bayeskd.*"]),
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
        "dev": ["pytest>=7", "pytest-xdist>=3.5",  # the README's test command runs the tests on 2 workers (-n 2)
                "nltk>=3.8", "matplotlib>=3.7", "psutil>=5.9", "pyarrow>=14", "hypothesis>=6.100",
                "peft>=0.17",  # CI tests the LoRA student
                "openai-whisper>=20240930", "tiktoken>=0.7"],  # and the tiny-gpt2 lab's tokenizers (lab-real)
        "peft": ["peft>=0.17"],  # distill --use-peft: train the student through a LoRA adapter
        # lab preset tiny-gpt2: GPT-2's and Whisper's tokenizer files (shipped in openai-whisper), checked with tiktoken
        "lab-real": ["openai-whisper>=20240930", "tiktoken>=0.7"],
    },
    entry_points={"console_scripts": ["bayeskd = bayeskd.cli:main"]},
)
