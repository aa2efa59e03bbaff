"""Reinforcement learning with curriculum sampling (RLCS): verifiable rewards (:mod:`glmv_jax.rl.rewards`),
difficulty tracking, tier-weighted sampling and the EMA rollout expansion (:mod:`glmv_jax.rl.curriculum`),
and one RL iteration (:mod:`glmv_jax.rl.rlcs`)."""
