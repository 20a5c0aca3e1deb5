"""Installation of metamd_jax: `pip install -e '.[test]'`."""

import pathlib
import re

from setuptools import find_packages, setup

_here = pathlib.Path(__file__).parent
_benchmark = ['psgdax==0.1.1', 'precondition-opt==0.3.0']
_version = re.search(r"__version__ = '([^']+)'",
                     (_here / 'metamd_jax' / '__init__.py').read_text()).group(1)

setup(
    name='metamd-jax',
    version=_version,
    description='Meta Mirror Descent: meta-learned Kronecker Bregman divergences as optax '
                'optimisers, with a convergence guarantee.',
    long_description=(_here / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['metamd_jax', 'metamd_jax.*']),
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.4.35',
        'jaxlib>=0.4.35',
        'optax>=0.2.4',
        'flax>=0.10',
        'chex>=0.1.87',
        'ml_collections>=0.1.1',
        'numpy>=1.26',
        'orbax-checkpoint>=0.6',
        'tqdm>=4.60',
        'matplotlib>=3.7',
        'absl-py>=1.4',
        'scikit-learn>=1.3',
        'mlxtend>=0.23',
        'mnist1d>=0.0.2',
    ],
    extras_require={
        # Optional baselines of the benchmark: PSGD-Kron and distributed Shampoo.
        'benchmark': _benchmark,
        'test': [
            'pytest>=8',
            'pytest-xdist>=3.2',
            'ruff>=0.6',
            *_benchmark,  # so the tests of those baselines run for real
        ],
    },
    license='Apache-2.0',
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
