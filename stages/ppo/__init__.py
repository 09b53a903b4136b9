"""The ppo stage: rollouts, the pure PPO math, and the training loop."""
