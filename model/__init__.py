"""The Gaze Attention VLM in PyTorch (configuration, modeling), its processor and scenes.

Kept free of imports so that torch-free modules here (scenes, processing) can be used
by the runtime without pulling in torch.
"""
