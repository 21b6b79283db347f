"""The human-feedback lifecycle beside SFT: candidate replies -> rankings -> preference pairs and their
gates -> reward model, DPO and PPO (losses and the PPO loop). Pure modules, testable without Dagster;
see docs/preference.md.
"""
