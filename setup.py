"""twotower: train the diffusion denoiser tower of a TwoTower block-diffusion LM.

The top-level folders install as one PEP 420 namespace (there is no ``twotower/``
folder): ``model/`` -> ``twotower.model``, ``data/`` -> ``twotower.data`` and so on,
so nothing lands in the global module namespace.

CPU / CI install (torch is pinned by ``.ci/constraints.txt``)::

    pip install torch==2.13.0 && pip install -e .[dev] -c .ci/constraints.txt

GPU cluster install adds Transformer Engine and mamba-ssm kernels::

    pip install -e .[gpu]
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
SUBPACKAGES = ["model", "data", "training", "launch", "conf"]


def _find(root: str) -> list[str]:
    """All python packages under ``root`` (a folder with ``__init__.py``), as twotower.* names."""
    out = []
    for init in sorted((HERE / root).rglob("__init__.py")):
        rel = init.parent.relative_to(HERE / root)
        out.append(".".join(["twotower", root, *rel.parts]) if rel.parts else f"twotower.{root}")
    return out


packages = [p for root in SUBPACKAGES for p in _find(root)]
package_dir = {f"twotower.{root}": root for root in SUBPACKAGES}

setup(
    name="twotower",
    version="0.1.0",
    description="Distributed pretraining of the TwoTower block-diffusion denoiser on a frozen Nemotron-H backbone",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    # hf_remote/: the modeling code copied into exported folders (data, not a package)
    package_data={"twotower.conf": ["*.yaml", "**/*.yaml"], "twotower.model": ["hf_remote/*.py"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        "hydra-core>=1.3",
        "webdataset>=0.2.100",
        "wandb>=0.17",
        "transformers>=4.57",
        "safetensors>=0.4",
        "einops>=0.7",
        "numpy>=1.24",
        "psutil",  # megatron's torch_dist checkpoint writer imports it without declaring it
        "lm-eval>=0.4.13,<0.5",  # twotower-eval: the model type "twotower" (training/lm_eval_model.py)
        "matplotlib>=3.7",  # twotower-bench-decode's bench.png
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.0", "mamba-ssm>=2.2", "causal-conv1d>=1.4"],
        "parquet": ["pyarrow>=14"],
        "dev": ["pytest>=8", "ruff>=0.5", "pyarrow>=14"],
    },
    entry_points={
        "console_scripts": [
            "twotower-tokenize=twotower.data.tokenize:main",
            "twotower-train=twotower.training.train:main",
            "twotower-launch=twotower.launch.cli:main",
            "twotower-plan=twotower.training.planner:main",
            "twotower-generate=twotower.training.generate:main",
            "twotower-demo=twotower.training.demo:main",
            "twotower-convert=twotower.training.convert:main",
            "twotower-eval=twotower.training.evaluate:main",
            "twotower-bench-decode=twotower.training.bench_decode:main",
        ]
    },
)
