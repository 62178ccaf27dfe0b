"""vpeft-viz: an interactive lab for visual parameter-efficient fine-tuning."""

__version__ = "0.1.0"
