"""Reusable composite PTransforms, one concern per module."""
