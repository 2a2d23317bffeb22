"""Packaging settings pyproject.toml cannot express: the config tree and the named sweeps live at the top
of the repository (conf/, sweeps/), where users read and edit them, and a wheel carries them inside the
package (rlhf/shipped/conf, rlhf/shipped/sweeps) so that an installed rlhf finds them (rlhf.layout)."""

from setuptools import find_packages, setup

SHIPPED = {"rlhf.shipped.conf": "conf", "rlhf.shipped.sweeps": "sweeps"}

setup(
    packages=[*find_packages(include=["rlhf", "rlhf.*"]), *SHIPPED],
    package_dir=SHIPPED,
    package_data={"rlhf.shipped.conf": ["**/*.yaml"], "rlhf.shipped.sweeps": ["*.yaml"]},
)
