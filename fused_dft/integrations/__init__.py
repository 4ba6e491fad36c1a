"""Thin adapters to trainers; each module imports its library (trl.py: TRL's SFTTrainer)."""
