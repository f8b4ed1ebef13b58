"""mme — multimodal unlearnable examples (Multi-step Error Minimization, arXiv 2407.16307)."""

__version__ = "0.1.0"
