"""Packaging for nodepass.

``twisted.plugins`` is listed as a package on purpose: it carries the twistd
plugin module and, like every Twisted plugin folder, has no ``__init__.py``.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "nodepass" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="nodepass",
    version=VERSION,
    description="A TCP/UDP tunnel daemon with a REST master, built on Twisted",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.11",
    packages=[
        "nodepass",
        "nodepass.tunnel",
        "nodepass.master",
        "twisted.plugins",
    ],
    package_data={"twisted.plugins": ["nodepass_plugin.py"], "nodepass.master": ["ui/*"]},
    install_requires=[
        "twisted[tls]>=24.7.0",
        "service-identity>=24.1.0",
        "pyopenssl>=24.2.0",
        "cryptography>=43.0.0",
        "spake2>=0.9",
        "autobahn>=24.4.2",
        "h2>=4.1",
        "aioquic>=1.2,<2",  # quicstream.py uses two of its internals
        "klein>=24.8.0",
        "werkzeug>=3.0",
        "swagger-ui-py>=25.7.1",
        "psutil>=5.9",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "test": [
            "hypothesis>=6.100",
            "treq>=24.9.1",
            "openapi-spec-validator>=0.7",
            "schemathesis>=4.0",
            "selenium>=4.20",
            "psycopg[binary]>=3.1",
        ],
        "postgresql": ["psycopg[binary]>=3.1"],
        "lint": ["ruff>=0.6"],
    },
    entry_points={"console_scripts": ["nodepass = nodepass.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
