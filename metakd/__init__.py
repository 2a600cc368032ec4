"""Meta-KD: meta knowledge distillation across domains, as a Ray Tune + Ray Train sweep system."""

__version__ = "0.1.0"
