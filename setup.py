"""What pyproject.toml cannot say: install `convert/orthrus_convert` (kept under the top-level
`convert/` folder of the design) beside orthrus_mlx's packages."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["orthrus_mlx", "orthrus_mlx.*"]) + ["orthrus_convert"],
    package_dir={"orthrus_convert": "convert/orthrus_convert"},
)
