"""What pyproject.toml cannot say: find orthrus_mlx's packages and install the top-level
`convert/` folder as `orthrus_convert` (the import name `convert` belongs to another project)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["orthrus_mlx", "orthrus_mlx.*"]) + ["orthrus_convert"],
    package_dir={"orthrus_convert": "convert"},
)
