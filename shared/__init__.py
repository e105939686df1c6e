"""What the gateway, the workers and the offline builder must agree on.

This package imports neither ``api`` nor ``worker`` and never imports torch.
"""
