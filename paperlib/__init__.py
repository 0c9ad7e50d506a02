"""paperlib: the library behind the ssm4rec companion notebooks.

Reproduces arXiv:2408.05606 (SSM recommenders, ORPO LLM recommender, adaptive training).
Notebooks in ``notebooks/`` only orchestrate the functions defined here.
"""

__version__ = "0.1.0"
