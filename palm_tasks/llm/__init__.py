"""Everything that touches a model: loading, sampling, rewards, prompts, GRPO, value vectors, soups."""
