"""cptrain: continual pre-training of Llama-family models with replay and Reptile."""

__version__ = "0.1.0"
