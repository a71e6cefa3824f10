"""sdcompress: train stochastic-depth ResNets, prune their blocks by learned survival statistics, and ship them.

The Python API (`find_blocks`, `remove_blocks`, `measure_drop_effects`, `prune`, `export_onnx`) works on any
residual network sdcompress recognises (torchvision's, its own CIFAR ResNets) or whose blocks are named; see
`sdcompress.api`. It is imported on first use, so `import sdcompress` stays light.
"""

__version__ = "0.1.0"

API = ("find_blocks", "survey_blocks", "remove_blocks", "measure_drop_effects", "prune", "train_stochastic_depth", "recalibrate",
       "finetune", "binarize", "export", "footprint", "export_onnx", "save", "load", "DropEffects", "Trained")
__all__ = ["__version__", *API]


def __dir__() -> list[str]:
    """The API too (it is imported on first use), so tab-completion and IDEs list it."""
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'sdcompress' has no attribute {name!r}")
