"""OpenAI-compatible server with a browser view of the denoising canvas."""
