"""Pure-torch maths of RLHF-PPO: masks, KL estimators/controllers, advantages, losses."""
