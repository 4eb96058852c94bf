"""Your own reward functions and prompts (docs/your-own.md); dvc.yaml tracks this folder."""
