"""PromptEHR: a prompt-conditioned BART denoiser over diagnosis-code patient records."""

__version__ = "0.1.0"
