"""slime_ray: Ray-native LLM post-training with reinforcement learning (slime's flags and plug-ins)."""

__version__ = "0.1.0"
