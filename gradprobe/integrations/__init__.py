"""Callbacks for training frameworks (each needs its framework installed: see the extras)."""
