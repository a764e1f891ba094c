"""gpufleet: bring NVIDIA GPU inference hosts to a declared state with pyinfra."""

__version__ = "0.1.0"
