"""Reinforcement learning with curriculum sampling (RLCS): verifiable rewards (:mod:`glmv_jax.rl.rewards`),
difficulty tracking, tier-weighted sampling and the EMA rollout expansion (:mod:`glmv_jax.rl.curriculum`),
one RL iteration (:mod:`glmv_jax.rl.rlcs`), the `rl:` config section (:mod:`glmv_jax.rl.config`) and
the loop (:mod:`glmv_jax.rl.loop`)."""
