"""The PPO stage: `Config` and `run`, split by job.

    config.py      the sections and the rules that tie fields together
    stage.py       `run`: inputs and their checks, then the loop
    models.py      policy, reference, reward and value models, the EMA
    experience.py  rollouts: sampling, scores, KL, advantages
    update.py      `PPOTrainer`: one rollout and its clipped policy/value updates
    evaluation.py  gold evals, sample answers, the run summary
    losses.py      pure functions: GAE, clipped losses, KL estimators and controllers
    sampling.py    per-episode keyed sampling (resume samples the very same answers)
    threads.py     CPU passes side by side
"""

from stages.ppo.config import Config
from stages.ppo.stage import run

__all__ = ["Config", "run"]
