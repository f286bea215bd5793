"""xtoken_loss: framework-agnostic distillation losses that consume xtoken projection artifacts.

The loss functions never import `xtoken_align`: they read the artifact format themselves.
"""

__version__ = "0.1.0"
