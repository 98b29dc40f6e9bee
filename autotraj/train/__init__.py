"""Training stages on transformers + TRL + accelerate.

- `batches.py`: SFT and preference examples from the one rendering (render.render_trajectory),
  with labels -100 on the prompt and on tool results; padding collators.
- `sft.py`: `autotraj sft` (TRL SFTTrainer on a pre-tokenized dataset; full fine-tuning or LoRA).
- `reward_model.py`: `autotraj rm` (Bradley-Terry trajectory reward model with TRL RewardTrainer)
  and `TrajectoryRewardModel`, the batched scoring API the RL stage uses.
- `grpo.py`, `grpo_update.py`, `advantages.py`, `policy_weights.py`: `autotraj rl` (GRPO with
  tool rollouts).
- `processes.py`: accelerate's process state, made once and the same way by every stage.

Nothing is imported here, so `import autotraj.train` never pulls in torch.
"""
