"""rlhf: SFT, reward modelling and PPO as declarative, tracked experiments."""

__version__ = "0.1.0"
